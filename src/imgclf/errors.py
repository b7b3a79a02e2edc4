"""The one exception type users see: a message that names the file, key or line and the fix."""


class ImgclfError(Exception):
    """A problem the user can fix; the CLI prints the message without a traceback."""
