"""Errors a user can cause. The CLI prints them as one line and exits with code 2.

Tracebacks are for bugs: anything that is the user's input (a bad recipe, a bad file,
mismatched shapes) raises a subclass of :class:`ShoalError` whose message names the file,
tensor or key at fault.
"""


class ShoalError(Exception):
    """Base class of every error caused by user input."""


class CheckpointError(ShoalError):
    """A weight file or model folder cannot be read or is inconsistent."""


class RecipeError(ShoalError):
    """A merge recipe or configuration is invalid (unknown key, bad value, unknown method)."""


class MergeError(ShoalError):
    """The sources cannot be merged as asked (missing tensor, shape mismatch, NaN in a source)."""


class TaskError(ShoalError):
    """An evaluation task or split is unknown or misused."""


class ConfigError(ShoalError):
    """A run configuration (evolve, svf, adapt) is invalid."""
