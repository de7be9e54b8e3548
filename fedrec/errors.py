"""One exception type per kind of bad input, each carrying a one-line message.

Entry points catch :class:`FedrecInputError`, print its message on one line and exit non-zero
before any run folder is written.
"""


class FedrecInputError(Exception):
    """Bad input from a user: a data file, a config value or a client upload."""


class DataError(FedrecInputError):
    """A data file is missing, malformed, or inconsistent (names the file and row)."""


class ConfigError(FedrecInputError):
    """A configuration value is unknown or out of range (names the config key)."""
