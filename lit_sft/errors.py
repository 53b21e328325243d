"""Errors that are the user's to fix: the CLIs print the message alone (no traceback) and exit 2."""


class UserError(Exception):
    """Bad input (config, file, record, path). The message names the file, line or field."""
