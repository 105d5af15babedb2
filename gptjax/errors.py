"""The one exception type gptjax raises for bad input at its boundaries."""

import errno
import os


class GptjaxError(ValueError):
    """Bad input (a value, a file, an option) named together with what is allowed."""


def os_cause(e: OSError) -> str:
    """An OSError's cause in one phrase, with its errno name: 'No space left on device (ENOSPC)'."""
    name = errno.errorcode.get(e.errno) if e.errno else None
    return f"{e.strerror or os.strerror(e.errno)} ({name})" if name else str(e)
