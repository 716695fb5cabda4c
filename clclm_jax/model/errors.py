"""One exception type for every model-side failure (bad checkpoint, config, LoRA target)."""


class ModelError(ValueError):
  """A model file or setting cannot be used; the message names the file and the problem."""
