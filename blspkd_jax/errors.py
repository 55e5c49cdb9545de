"""The one error type every command reports as a single line: a mistake the user can fix.

Each part of the package raises its own subclass (ConfigError, DataError, WeightsError, ...)
whose message names the file, line or config key and what was expected. They live in their own
modules; this base lets `cli.run` recognise all of them without importing those modules (and
with them JAX, grain, orbax and transformers) before the command has even parsed its arguments.
"""


class UserError(ValueError):
    """A mistake in the user's input; the message names where and what was expected."""
