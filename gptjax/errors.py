"""The one exception type gptjax raises for bad input at its boundaries."""


class GptjaxError(ValueError):
    """Bad input (a value, a file, an option) named together with what is allowed."""
