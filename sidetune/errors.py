"""The one exception type users see: a single paragraph naming the problem and its fix."""


class SidetuneError(Exception):
    """A user-facing error. The message names the thing that is wrong and how to fix it.

    The CLI prints these without a traceback; any other exception is a bug in sidetune.
    """


class Interrupted(BaseException):
    """Ctrl-C during long work, saying what was kept and how to resume; the CLI prints the
    message and exits with status 130. Like KeyboardInterrupt it is no `Exception`, so nothing
    that handles errors swallows it; unlike it, typer lets it through to the CLI's entry point."""
