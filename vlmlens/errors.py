"""Errors a user can cause, each with a message that says what to change."""


class InputError(ValueError):
    """Bad user input (image, prompt, settings, paths). The message is shown as is."""
