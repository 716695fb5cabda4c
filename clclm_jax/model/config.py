"""Model and LoRA hyper-parameters: `LlamaConfig` (with named presets) and `LoraConfig`."""

import dataclasses
from typing import Any

from clclm_jax.model.errors import ModelError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3", "linear")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA-family decoder: Llama 1-3, Mistral, Qwen2 / Qwen2.5, Qwen3 (names follow
  the Hugging Face configs of those families).

  `rope_scaling`: Hugging Face's rope parameters other than rope_theta as sorted (key, value) pairs (hashable:
  configs are static arguments of compiled functions); () is plain RoPE. `rope_freq_factors`: llama.cpp's
  per-frequency divisors of the inverse frequencies (a GGUF `rope_freqs` tensor, how llama.cpp stores llama3
  scaling). `bias_projections`: the projections with a bias (Qwen2: q, k, v). `qk_norm`: RMSNorm over each
  head's queries and keys before RoPE (Qwen3). `sliding_window`: a query sees itself and the window - 1 keys
  before it, on the layers `layer_types` marks "sliding_attention" (all layers when `layer_types` is ())."""

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
  model_type: str = "llama"
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  rope_freq_factors: tuple[float, ...] = ()
  bias_projections: tuple[str, ...] = ()
  qk_norm: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ModelError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.model_type not in FAMILIES:
      raise ModelError(f"model_type={self.model_type!r} is not supported: use one of {', '.join(FAMILIES)}")
    for name in ("rope_freq_factors", "bias_projections", "layer_types"):  # lists (from JSON) -> tuples: hashable
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "rope_scaling", tuple(tuple(kv) for kv in self.rope_scaling))
    scaling = dict(self.rope_scaling)
    if scaling.get("rope_type", "default") not in ROPE_TYPES:
      raise ModelError(f"rope_scaling rope_type={scaling.get('rope_type')!r} is not supported: use one of "
                       f"{', '.join(ROPE_TYPES)}")
    if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
      raise ModelError(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, expected head_dim / 2 = "
                       f"{self.head_dim // 2}")
    bad = [p for p in self.bias_projections if p not in LORA_TARGETS]
    if bad:
      raise ModelError(f"bias_projections {bad} unknown: choose from {', '.join(LORA_TARGETS)}")
    window = self.sliding_window
    if window is not None and (type(window) is not int or window < 1):  # noqa: E721 (bool is not a size)
      raise ModelError(f"sliding_window={self.sliding_window!r} is not a positive whole number (None: no window)")
    if self.layer_types and (len(self.layer_types) != self.num_hidden_layers
                             or any(t not in LAYER_TYPES for t in self.layer_types)):
      raise ModelError(f"layer_types={list(self.layer_types)} must name one of {', '.join(LAYER_TYPES)} for each "
                       f"of the {self.num_hidden_layers} layers")

  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether its attention is limited to the sliding window."""
    if self.sliding_window is None:
      return (False,) * self.num_hidden_layers
    if not self.layer_types:
      return (True,) * self.num_hidden_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
    """Reads a Hugging Face `config.json` dict of a llama, mistral, qwen2 or qwen3 model; refuses, naming the
    field, what this model cannot run."""
    arch = d.get("model_type")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings"):
      if d.get(k) is not None and (type(d[k]) is not int or d[k] <= 0):  # noqa: E721 (bool is not a size)
        raise ModelError(f"{source}: {k}={d[k]!r} is not a positive whole number; fix: write it as one, without "
                         "quotes")
    if arch not in (*FAMILIES, None):
      raise ModelError(f"{source}: model_type {arch!r} is not supported (only {', '.join(map(repr, FAMILIES))})")
    arch = arch or "llama"
    refuse = _refusals(d, arch)
    if refuse:
      raise ModelError(f"{source}: {refuse}")
    scaling = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = d.get("rope_theta", scaling.pop("rope_theta", 10000.0))
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    rope_scaling = ()
    if rope_type == "llama3":
      need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
      missing = [k for k in need if scaling.get(k) is None]
      if missing:
        raise ModelError(f"{source}: rope_scaling of type 'llama3' lacks {', '.join(missing)}")
      rope_scaling = (("rope_type", "llama3"), *((k, float(scaling[k])) for k in need[:3]),
                      (need[3], int(scaling[need[3]])))
    elif rope_type == "linear":
      rope_scaling = (("rope_type", "linear"), ("factor", float(scaling["factor"])))
    heads = d["num_attention_heads"]
    layers = d["num_hidden_layers"]
    eos = d.get("eos_token_id")
    bias: tuple[str, ...] = ()
    if arch == "qwen2":  # Qwen2 always has q, k, v biases (its attention_bias field is unused)
      bias = ("q_proj", "k_proj", "v_proj")
    elif d.get("attention_bias"):
      bias = ("q_proj", "k_proj", "v_proj", "o_proj")
    if d.get("mlp_bias"):
      bias += ("gate_proj", "up_proj", "down_proj")
    window, layer_types = None, ()
    if arch == "mistral":
      window = d.get("sliding_window")  # every layer (Mistral ignores layer_types)
    elif arch in ("qwen2", "qwen3") and d.get("use_sliding_window") and d.get("sliding_window") is not None:
      window = d["sliding_window"]
      layer_types = tuple(d.get("layer_types") or ("sliding_attention" if i >= d.get("max_window_layers", 28)
                                                   else "full_attention" for i in range(layers)))
    try:
      return cls(
          vocab_size=d["vocab_size"],
          hidden_size=d["hidden_size"],
          intermediate_size=d["intermediate_size"],
          num_hidden_layers=layers,
          num_attention_heads=heads,
          num_key_value_heads=d.get("num_key_value_heads") or heads,
          head_dim=d.get("head_dim") or d["hidden_size"] // heads,
          rms_norm_eps=d.get("rms_norm_eps", 1e-6),
          rope_theta=float(theta),
          max_position_embeddings=d.get("max_position_embeddings", 2048),
          tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
          bos_token_id=d.get("bos_token_id"),
          eos_token_id=eos[0] if isinstance(eos, list) else eos,
          model_type=arch,
          rope_scaling=rope_scaling,
          bias_projections=bias,
          qk_norm=arch == "qwen3",
          sliding_window=window,
          layer_types=layer_types,
      )
    except ModelError as e:
      raise ModelError(f"{source}: {e}") from e

  def to_hf_dict(self) -> dict[str, Any]:
    """The matching Hugging Face config keyword arguments of this family (`from_hf_dict` reads them back)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name not in ("rope_scaling", "rope_freq_factors", "bias_projections", "qk_norm", "sliding_window",
                           "layer_types")}
    if self.rope_freq_factors:
      raise ModelError("rope_freq_factors (llama.cpp rope_freqs) have no Hugging Face config field")
    if self.rope_scaling:
      d["rope_scaling"] = dict(self.rope_scaling)
    bias = set(self.bias_projections)
    if self.model_type == "qwen2":
      if bias != {"q_proj", "k_proj", "v_proj"}:
        raise ModelError(f"bias_projections={self.bias_projections}: Qwen2 has biases on q, k, v exactly")
    else:
      d["attention_bias"] = bool(bias & {"q_proj", "k_proj", "v_proj", "o_proj"})
      if self.model_type == "llama":
        d["mlp_bias"] = bool(bias & {"gate_proj", "up_proj", "down_proj"})
    if self.model_type == "mistral":
      d["sliding_window"] = self.sliding_window
    elif self.model_type in ("qwen2", "qwen3"):
      d["use_sliding_window"] = self.sliding_window is not None
      d["sliding_window"] = self.sliding_window
      d["max_window_layers"] = self.num_hidden_layers
      if self.sliding_window is not None:
        d["layer_types"] = list(self.layer_types or ("sliding_attention",) * self.num_hidden_layers)
    return d


def _refusals(d: dict[str, Any], arch: str) -> str | None:
  """Why a Hugging Face config asks for something this model does not compute (naming the field), or None."""
  scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    return (f"rope_scaling type {rope_type!r} is not supported (only {', '.join(map(repr, ROPE_TYPES))}): "
            f"{dict(scaling)!r}")
  if d.get("hidden_act", "silu") != "silu":
    return f"hidden_act={d['hidden_act']!r} is not supported (only 'silu', SwiGLU)"
  if (d.get("partial_rotary_factor") or scaling.get("partial_rotary_factor") or 1.0) != 1.0:
    return "partial_rotary_factor < 1 is not supported (RoPE on the whole head)"
  if d.get("quantization_config"):
    method = d["quantization_config"].get("quant_method", "?")
    return (f"quantization_config ({method}) is not supported: load the float checkpoint (model.quantize='int8' "
            "quantises it here)")
  if d.get("attention_dropout"):
    return f"attention_dropout={d['attention_dropout']} is not supported (no dropout inside attention): set 0.0"
  if arch in ("mistral", "qwen2", "qwen3") and d.get("mlp_bias"):
    return f"mlp_bias=true is not supported for model_type {arch!r} (transformers has no such bias)"
  if arch == "mistral" and d.get("attention_bias"):
    return "attention_bias=true is not supported for model_type 'mistral' (transformers has no such bias)"
  if arch in ("qwen2", "qwen3") and d.get("use_sliding_window") and d.get("layer_types") and any(
      t not in LAYER_TYPES for t in d["layer_types"]):
    return f"layer_types {sorted(set(d['layer_types']) - set(LAYER_TYPES))} are not supported (only {LAYER_TYPES})"
  return None


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
    # Shapes of today's checkpoints (meta-llama/Llama-3.1-8B and Qwen/Qwen2.5-7B config.json), for memory plans.
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001,
        rope_scaling=(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                      ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192))),
    "qwen2.5-7b": LlamaConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151643, model_type="qwen2",
        bias_projections=("q_proj", "k_proj", "v_proj")),
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
