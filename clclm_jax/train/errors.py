"""A config value that cannot work with the data or the run; the message names the field and the fix."""


class ConfigError(ValueError):
  """Raised for `config.*` values; train.py / eval.py print it as one line, without a traceback."""
