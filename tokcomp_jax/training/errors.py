"""The error a training config raises for a field that cannot work."""


class ConfigError(ValueError):
    """A training config field holds a value that cannot work."""
