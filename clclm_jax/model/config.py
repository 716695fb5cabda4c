"""Model and LoRA hyper-parameters: `LlamaConfig` (with named presets) and `LoraConfig`."""

import dataclasses
from typing import Any

from clclm_jax.model.errors import ModelError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA-family decoder (names follow Hugging Face `LlamaConfig`)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ModelError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
    """Reads a Hugging Face `config.json` dict; rejects what this model cannot run."""
    arch = d.get("model_type")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings"):
      if d.get(k) is not None and (type(d[k]) is not int or d[k] <= 0):  # noqa: E721 (bool is not a size)
        raise ModelError(f"{source}: {k}={d[k]!r} is not a positive whole number; fix: write it as one, without "
                         "quotes")
    if arch not in ("llama", None):
      raise ModelError(f"{source}: model_type {arch!r} is not supported (only 'llama')")
    for flag in ("attention_bias", "mlp_bias"):
      if d.get(flag):
        raise ModelError(f"{source}: {flag}=true is not supported by this LLaMA implementation")
    scaling = d.get("rope_scaling") or (d.get("rope_parameters") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
      raise ModelError(f"{source}: rope scaling {scaling!r} is not supported")
    theta = d.get("rope_theta", scaling.get("rope_theta", 10000.0))
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The matching Hugging Face `LlamaConfig` keyword arguments."""
    d = dataclasses.asdict(self)
    d["model_type"] = "llama"
    return d


presets: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(  # its context holds configs/tiny.py's prompts of up to 1024 bytes
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2),
    "llama-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters on the named projections: update = dropout(x) @ A @ B * alpha / r."""

  r: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    bad = [t for t in self.targets if t not in LORA_TARGETS]
    if bad:
      raise ModelError(f"LoRA target(s) {bad} unknown: choose from {', '.join(LORA_TARGETS)}")
    if self.r < 1:
      raise ModelError(f"LoRA rank r={self.r} must be >= 1")
    if not 0.0 <= self.dropout < 1.0:
      raise ModelError(f"LoRA dropout={self.dropout} must be in [0, 1)")

  @property
  def scaling(self) -> float:
    return self.alpha / self.r
