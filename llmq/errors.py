"""Errors caused by the user's input: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input (recipe key, file, model name, dataset row) with a message that names what is wrong."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the last good weights were saved as a checkpoint."""
