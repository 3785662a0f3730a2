"""The one exception type for bad user input."""


class InputError(Exception):
    """A config value, data file or model that cannot work; the message is one line naming the fix.

    Raised before training starts; train.py prints ``error: <message>`` and exits with status 1.
    """
