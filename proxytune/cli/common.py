"""What every command module shares: turning user errors into one line and exit 2, the --uri option."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from proxytune.errors import ProxytuneError, access_message, disk_full_message


def user_errors(func):
    """Print ProxytuneError, a full disk and a folder this process may not write (anywhere: proxytune's
    own files, DVC's, a library's cache), as one line on stderr and exit 2; no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ProxytuneError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: re-run the same command to resume", err=True)
            sys.exit(130)
        except Exception as err:
            message = disk_full_message(err) or access_message(err)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(2)

    return wrapper


uri_option = click.option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or ./registry).")


def tracking_uri(uri: str | None) -> str:
    """--uri, else $MLFLOW_TRACKING_URI, else the embedded store of the current folder (which must exist)."""
    from proxytune.tracking import store

    return store.resolve_uri(uri, Path.cwd(), create=False)
