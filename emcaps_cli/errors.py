"""The one exception type the command line turns into a one-line message."""


class EmcapsError(Exception):
    """A problem the user can fix (bad file, bad option). The message names the file or option."""
