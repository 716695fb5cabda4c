"""clclm-jax: pure-JAX alignment of LLaMA-family language models with recommendation."""

import importlib

_PUBLIC = {"LlamaConfig": "clclm_jax.model.config", "LoraConfig": "clclm_jax.model.config",
           "load_model": "clclm_jax.model.loading", "export_peft": "clclm_jax.model.peft",
           "load_peft": "clclm_jax.model.peft", "generate": "clclm_jax.model.generate"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  """Imports a public name on first use: `import clclm_jax.train.malloc` must not pull in jax (see train.py)."""
  if name not in _PUBLIC:
    raise AttributeError(f"module 'clclm_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_PUBLIC[name]), name)
