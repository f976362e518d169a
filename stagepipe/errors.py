"""Exceptions that the CLI turns into one clear line and a non-zero exit code."""


class StagepipeError(Exception):
    """Base class for errors reported to the user as one line."""

    exit_code = 1


class ConfigError(StagepipeError):
    """A pipeline file is unreadable or invalid: names the file, the key and what was expected."""

    exit_code = 2


class InputError(StagepipeError):
    """An input named by the pipeline cannot be used (a missing model file or package, an unreadable
    text file): names the key, the file and what was expected, like a config error."""

    exit_code = 2


class WorkspaceBusyError(StagepipeError):
    """Another driver holds the workspace lock."""

    exit_code = 3


class StageFailedError(StagepipeError):
    """A stage partition raised; carries the partition, host and the command to resume."""

    exit_code = 1


class MetricError(StagepipeError):
    """A metric (left or right weighting matrix) is unusable: non-finite or without positive mass."""
