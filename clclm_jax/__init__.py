"""clclm-jax: pure-JAX alignment of LLaMA-family language models with recommendation."""

from clclm_jax.model.config import LlamaConfig, LoraConfig
