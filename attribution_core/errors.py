"""Exception types. User mistakes subclass ``ValueError`` and map to exit code 2 in the CLI;
:class:`JobFailedError` (work that failed for a system reason) maps to exit code 1, still as one
line without a traceback."""

from __future__ import annotations


class AttributionError(ValueError):
    """Bad input from the user: a config value, a file, a shape. CLI exit code 2."""

    exit_code = 2


class ConfigError(AttributionError):
    """A config key, name or value is invalid; the message names the key path and valid choices."""


class DataError(AttributionError):
    """A data file is missing or malformed, or shapes of train and query data disagree."""


class NumericalError(AttributionError):
    """NaN/Inf or a singular system; the message says where (layer, chunk) and by how much."""


class JobFailedError(AttributionError):
    """A job failed for a system reason (a worker or node died more often than retries allow):
    not bad input, so CLI exit code 1; the message says how to resume."""

    exit_code = 1
