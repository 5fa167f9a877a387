"""The one exception type the command line turns into a one-line message, and the warning it
shows as one line."""


class EmcapsError(Exception):
    """A problem the user can fix (bad file, bad option). The message names the file or option."""


class FallbackWarning(UserWarning):
    """A slower path taken than the one asked for (routing kernels that cannot run here). The
    command line shows it as one `warning: ...` line."""
