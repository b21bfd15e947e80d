"""Errors the user can fix."""


class DetoxError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits non-zero."""
