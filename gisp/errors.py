class GispError(Exception):
    """A user-facing error: the message names the problem and the fix."""
