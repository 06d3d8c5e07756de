"""Errors that reach the user as one clear message and a non-zero exit, never a traceback."""


class UserError(Exception):
    """A problem the user can fix: the message names it and says how."""


class ConfigError(UserError):
    """The configuration file or an override is invalid."""


class DataError(UserError):
    """A data file is missing, unreadable or corrupt."""


class NonFiniteError(UserError):
    """Training produced a NaN or infinity; the last good checkpoint is kept."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)
