"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class ProxytuneError(Exception):
    """Bad input or an unrecoverable condition a user can fix (spec, images, model names, paths)."""


class SpecError(ProxytuneError):
    """A spec file failed to parse or validate; the message names the file and the key path."""
