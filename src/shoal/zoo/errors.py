"""The zoo's error type, in a module of its own so that light modules can raise it."""

from shoal.errors import ShoalError


class ZooError(ShoalError):
    """A zoo world cannot be built or read as asked (bad folder, unknown model)."""
