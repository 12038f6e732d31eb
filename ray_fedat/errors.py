"""The user-mistake exception, in a module of its own: data, partition and checkpoints
raise subclasses of it without importing the whole configuration (or torch)."""


class ConfigError(ValueError):
    """A user mistake in the run's configuration; the CLI prints it as one line."""
