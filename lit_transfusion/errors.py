"""Errors every layer may raise and the command line reports as one line."""


class SettingError(ValueError):
    """A setting that makes the command impossible, found once it runs (e.g. a data directory that holds no
    validation sample): ``python -m lit_transfusion`` prints ``error: <message>`` and exits with status 2, without
    a traceback. The message names the setting and what it should be."""
