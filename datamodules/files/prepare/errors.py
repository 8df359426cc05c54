"""The error ``prepare`` raises for a setting or a source it cannot work with."""

from __future__ import annotations

from lit_transfusion.errors import SettingError


class PrepareError(SettingError):
    """A setting or a source that makes preparing impossible: the command line prints it as one line
    ``error: <message>`` and exits with status 2."""
