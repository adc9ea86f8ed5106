"""The one exception type users see: a single paragraph naming the problem and its fix."""


class SidetuneError(Exception):
    """A user-facing error. The message names the thing that is wrong and how to fix it.

    The CLI prints these without a traceback; any other exception is a bug in sidetune.
    """
