"""Fixtures made the way the releases are made: one module per model family.

Each module writes small random-weight folders laid out exactly as a released checkpoint is (the
release's config fields, key names, shape rules, tokenizer files, file format and dtype; only the sizes
shrink), and gives the release's full-size configuration for the meta-device layout checks.
"""
