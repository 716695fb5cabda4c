"""clclm-jax: pure-JAX alignment of LLaMA-family language models with recommendation."""

from clclm_jax.model.config import LlamaConfig, LoraConfig
from clclm_jax.model.loading import load_model
from clclm_jax.model.peft import export_peft, load_peft
