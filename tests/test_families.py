"""Llama 3.x (llama3 rope), Mistral (sliding window, linear rope), Qwen2 (q/k/v bias, tied, mixed sliding
layers) and Qwen3 (per-head q/k RMSNorm) against transformers on tiny random checkpoints: logits with left
padding and packing, int8, PEFT round trips, GGUF copies, hub downloads and every refused config field."""

import dataclasses
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from clclm_jax.model import loading
from clclm_jax.model.config import LORA_TARGETS, LlamaConfig, LoraConfig
from clclm_jax.model.errors import ModelError
from clclm_jax.model.loading import load_model
from clclm_jax.model.peft import export_peft, load_peft
from test_model import TOKENS, hf_logits, save_peft_adapter

WINDOW = 4  # shorter than TOKENS' 11 tokens, so the sliding window changes the logits
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
             eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # head_dim 16: all three bands
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(head_dim=16, rope_parameters=LLAMA3_ROPE, attention_bias=True,
                                              mlp_bias=True)),  # biases: llama's own, on every projection
    "mistral": (transformers.MistralConfig, dict(
        head_dim=16, sliding_window=WINDOW, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0})),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6})),
    "qwen2_sliding": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                     max_window_layers=1)),  # layer 0 full, layer 1 sliding
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),  # head_dim != 64 / 4
}
CAUSAL_LM = {transformers.LlamaConfig: transformers.LlamaForCausalLM,
             transformers.MistralConfig: transformers.MistralForCausalLM,
             transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
             transformers.Qwen3Config: transformers.Qwen3ForCausalLM}


def save_family(path, family: str, seed: int = 0):
  """A random tiny model of `family` saved with `save_pretrained`; returns the torch model."""
  torch.manual_seed(seed)
  config_cls, extra = FAMILIES[family]
  hf = CAUSAL_LM[config_cls](config_cls(**SHAPE, **extra)).eval()
  with torch.no_grad():  # non-trivial norms and biases, so a wrong layout or a dropped term shows
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))
  hf.save_pretrained(path)
  return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  hf = save_family(path, request.param)
  model, _ = load_model(path)
  return request.param, hf, model, path


def test_config_reads_the_family(family):
  name, hf, model, path = family
  cfg = model.config
  assert cfg == LlamaConfig.from_hf_dict(cfg.to_hf_dict())  # written back and read again: the same config
  expected = {
      "llama3": dict(model_type="llama", bias_projections=LORA_TARGETS,
                     rope_scaling=(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                                   ("high_freq_factor", 4.0), ("original_max_position_embeddings", 64))),
      "mistral": dict(model_type="mistral", sliding_window=WINDOW, layer_types=(),
                      rope_scaling=(("rope_type", "linear"), ("factor", 2.0))),
      "qwen2": dict(model_type="qwen2", bias_projections=("q_proj", "k_proj", "v_proj"), tie_word_embeddings=True,
                    sliding_window=None, rope_theta=1e6),
      "qwen2_sliding": dict(sliding_window=WINDOW, layer_types=("full_attention", "sliding_attention")),
      "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=32, bias_projections=(), tie_word_embeddings=True),
  }[name]
  assert {k: getattr(cfg, k) for k in expected} == expected
  assert cfg.sliding_layers() == {"mistral": (True, True), "qwen2_sliding": (False, True)}.get(name, (False, False))
  assert (model.lm_head is None) == cfg.tie_word_embeddings


def test_parity_with_transformers(family):
  _, hf, model, _ = family
  ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(ours, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_parity_left_padding(family):
  _, hf, model, _ = family
  mask = np.ones_like(TOKENS)
  mask[0, :4] = 0
  mask[1, :1] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ours = np.asarray(model(jnp.asarray(TOKENS), attention_mask_bt=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], hf_logits(hf, TOKENS, mask, positions)[real], atol=1e-4, rtol=0)


def test_parity_packed(family):
  """Packed segments (8 and 7 tokens, each longer than the window) give transformers' logits of each alone, with
  the layers under scan and, where a window picks each layer's mask, in the Python loop too."""
  _, hf, model, _ = family
  tokens = np.concatenate([TOKENS[0, :8], TOKENS[1, :7], [0]])[None]
  seg = np.array([[1] * 8 + [2] * 7 + [0]])
  for scan in (True, False) if model.config.sliding_window else (True,):
    model = nnx.clone(model)
    model.scan_layers = scan
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask_bt=jnp.asarray(seg)))
    np.testing.assert_allclose(ours[0, :8], hf_logits(hf, TOKENS[:1, :8])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[0, 8:15], hf_logits(hf, TOKENS[1:2, :7])[0], atol=1e-4, rtol=0)


def test_kv_cache_decode_and_prefix_cache_match_the_full_forward(family):
  """The sliding window is honoured by the KV cache (prefill, then one token a step) and the prefix cache."""
  _, _, model, _ = family
  tokens = jnp.asarray(TOKENS[:2])
  full = model.hidden_states(tokens)
  h, cache = model.decode(tokens[:, :5], model.init_cache(2, 11), 0)
  steps = [h]
  for i in range(5, 11):
    h, cache = model.decode(tokens[:, i:i + 1], cache, i)
    steps.append(h)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-4, rtol=0)
  prefix = model.prefix_cache(tokens[0, :5])
  rest = model.hidden_states(tokens[:1, 5:], prefix_kv=prefix)
  np.testing.assert_allclose(np.asarray(rest[0]), np.asarray(full[0, 5:]), atol=1e-4, rtol=0)


def test_int8_forward_equals_float_forward_on_dequantised_weights(family):
  _, _, model, path = family
  model8, _ = load_model(path, quantize="int8")
  dequantised = nnx.clone(model)
  for (_, lin_f), (_, lin_q) in zip(dequantised.projections(), model8.projections()):
    lin_f.set_kernel(lin_q.weight())
  if model8.lm_head is not None:
    dequantised.lm_head.set_kernel(model8.lm_head.weight())
  tokens = jnp.asarray(TOKENS)
  np.testing.assert_allclose(np.asarray(model8(tokens)), np.asarray(dequantised(tokens)), atol=1e-4, rtol=0)


def test_peft_round_trip(family, tmp_path):
  """Our adapter loads in peft with our logits; a peft-trained adapter loads here with peft's logits."""
  _, _, _, path = family
  lora = LoraConfig(r=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
  model, _ = load_model(path, lora=lora, lora_seed=3)
  for j, (_, lin) in enumerate(model.projections(lora.targets)):
    lin.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(j), lin.lora_b.shape))
  out = export_peft(model, tmp_path / "ours", base_model_name_or_path=str(path))
  ours = np.asarray(model(jnp.asarray(TOKENS)))
  theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path), out).eval()
  np.testing.assert_allclose(ours, hf_logits(theirs, TOKENS), atol=1e-4, rtol=0)

  trained = save_peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(path), ["k_proj", "o_proj", "up_proj"],
                              tmp_path / "theirs")
  base, _ = load_model(path)
  load_peft(base, tmp_path / "theirs")
  got = np.asarray(base(jnp.asarray(TOKENS)))
  np.testing.assert_allclose(got, hf_logits(trained, TOKENS), atol=1e-4, rtol=0)
  assert np.abs(got - hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path), TOKENS)).max() > 1e-3


# GGUF copies, written as llama.cpp's converter writes them.

GGUF_ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}
GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def gguf_vocab(n: int) -> list[str]:
  """3 control tokens, "12" and "123" (merges "1 2", "12 3"), then byte-level characters up to n tokens."""
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  return ["<|endoftext|>", "<s>", "</s>", "12", "123"] + sorted(pre_tokenizers.ByteLevel.alphabet())[:n - 5]


def llama3_rope_freqs(cfg) -> np.ndarray:
  """llama.cpp's `rope_freqs` for llama3 scaling: the divisor of each inverse frequency."""
  p, d = cfg.rope_parameters, cfg.head_dim  # llama sets head_dim
  inv_freq = 1.0 / p["rope_theta"] ** (np.arange(0, d, 2) / d)
  context, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                                p["factor"])
  out = []
  for wavelen in 2 * np.pi / inv_freq:
    if wavelen < context / high:
      out.append(1.0)
    elif wavelen > context / low:
      out.append(factor)
    else:
      smooth = (context / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def write_gguf(path, hf, arch: str, meta: dict | None = None, pre: str | None = None):
  """An F32 GGUF of a tiny HF model: llama's Q/K rows (and biases) permuted to llama.cpp's rotary layout, llama3
  rope as a `rope_freqs` tensor, `meta` as extra metadata."""
  cfg = hf.config
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(head_dim)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre or PRE.get(arch, "default"))
  w.add_token_list(gguf_vocab(cfg.vocab_size))
  w.add_token_types([3] * 3 + [1] * (cfg.vocab_size - 3))
  w.add_token_merges(["1 2", "12 3"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for k, v in (meta or {}).items():
    (w.add_string if isinstance(v, str) else w.add_uint32)(f"{arch}.{k}", v)
  if cfg.rope_parameters.get("rope_type") == "llama3":
    w.add_tensor("rope_freqs.weight", llama3_rope_freqs(cfg))
  for name, p in hf.state_dict().items():
    x = p.float().numpy()
    parts = name.split(".")
    if name.startswith("model.layers."):
      if arch == "llama" and parts[-2] in ("q_proj", "k_proj"):
        heads = cfg.num_attention_heads if parts[-2] == "q_proj" else cfg.num_key_value_heads
        x = x.reshape(heads, 2, x.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(x.shape)
      gname = f"blk.{parts[2]}.{GGUF_BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}[name]
    if gname == "output.weight" and cfg.tie_word_embeddings:
      continue
    w.add_tensor(gname, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("name", ["qwen2", "llama3", "qwen3"])
def test_gguf_copy_gives_the_safetensors_logits(name, tmp_path):
  hf = save_family(tmp_path / "hf", name, seed=4)
  write_gguf(tmp_path / "m.gguf", hf, GGUF_ARCH[name])
  model, tokenizer = load_model(tmp_path / "m.gguf")
  reference, _ = load_model(tmp_path / "hf")
  for field in ("model_type", "bias_projections", "qk_norm", "tie_word_embeddings", "head_dim", "rope_theta"):
    assert getattr(model.config, field) == getattr(reference.config, field), field
  assert bool(model.config.rope_freq_factors) == (name == "llama3")
  tokens = jnp.asarray(TOKENS)
  np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(reference(tokens)), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(hf, TOKENS), atol=1e-4, rtol=0)
  # The pre-tokenizer of each family: Llama 3 keeps up to 3 digits together, Qwen2 splits every digit.
  pieces = tokenizer.convert_ids_to_tokens(tokenizer("12345 12")["input_ids"])
  assert pieces == {"llama3": ["123", "4", "5", "Ġ", "12"], "qwen2": ["1", "2", "3", "4", "5", "Ġ", "1", "2"],
                    "qwen3": ["1", "2", "3", "4", "5", "Ġ", "1", "2"]}[name]
  assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")


def test_gguf_refusals(tmp_path):
  hf = save_family(tmp_path / "hf", "qwen2", seed=4)
  write_gguf(tmp_path / "w.gguf", hf, "qwen2", {"attention.sliding_window": 4})
  with pytest.raises(ModelError, match=r"w.gguf: GGUF metadata qwen2.attention.sliding_window is not supported"):
    load_model(tmp_path / "w.gguf")
  write_gguf(tmp_path / "y.gguf", hf, "qwen2", {"rope.scaling.type": "yarn"})
  with pytest.raises(ModelError, match=r"y.gguf: GGUF metadata qwen2.rope.scaling.type='yarn' is not supported"):
    load_model(tmp_path / "y.gguf")
  write_gguf(tmp_path / "g.gguf", hf, "gemma2")
  with pytest.raises(ModelError, match=r"g.gguf: GGUF architecture 'gemma2' is not supported \(only 'llama', 'qwen2'"):
    load_model(tmp_path / "g.gguf")


def test_gguf_unknown_pre_tokenizer_is_refused(tmp_path):
  hf = save_family(tmp_path / "hf", "qwen2", seed=4)
  write_gguf(tmp_path / "p.gguf", hf, "qwen2", pre="deepseek-llm")
  with pytest.raises(ModelError, match=r"p.gguf: GGUF tokenizer.ggml.pre 'deepseek-llm' is not supported"):
    load_model(tmp_path / "p.gguf")


# Hugging Face hub ids as model.source (no network here: the download function is replaced).

def test_hub_id_downloads_into_the_cache(tmp_path, monkeypatch):
  hf = save_family(tmp_path / "local", "qwen2", seed=5)
  calls = []

  def fake_download(repo_id, cache):
    calls.append((repo_id, cache))
    target = cache / "models--Qwen--Tiny" / "snapshots" / "0"
    shutil.copytree(tmp_path / "local", target)
    return str(target)

  monkeypatch.setattr(loading, "hub_download", fake_download)
  monkeypatch.chdir(tmp_path)  # "Qwen/Tiny" is not a local folder here
  model, _ = load_model("Qwen/Tiny", cache_dir=tmp_path / "cache")
  assert calls == [("Qwen/Tiny", tmp_path / "cache" / "hub")]
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), hf_logits(hf, TOKENS), atol=1e-4, rtol=0)
  monkeypatch.setenv("CLCLM_CACHE", str(tmp_path / "env_cache"))
  calls.clear()
  load_model("Qwen/Tiny")
  assert calls == [("Qwen/Tiny", tmp_path / "env_cache" / "hub")]  # the project's cache by default


def test_hub_id_offline_fails_with_one_line_naming_the_id_and_the_fix(tmp_path, monkeypatch):
  from huggingface_hub.errors import LocalEntryNotFoundError  # pylint: disable=g-import-not-at-top

  def offline(repo_id, cache):
    raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified revision "
                                  "on the local disk and outgoing traffic has been disabled.\nTo enable ...")

  monkeypatch.setattr(loading, "hub_download", offline)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ModelError) as e:
    load_model("meta-llama/Llama-3.2-1B", cache_dir=tmp_path)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("model.source='meta-llama/Llama-3.2-1B': cannot download it from the Hugging Face hub "
                        "(LocalEntryNotFoundError: Cannot find")
  assert msg.endswith("and set model.source to that local folder DIR")
  monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)  # huggingface_hub not installed
  with pytest.raises(ModelError, match=r"model.source='meta-llama/Llama-3.2-1B' is a Hugging Face hub id and "
                                       r"downloading needs huggingface_hub \(pip install huggingface_hub\)"):
    load_model("meta-llama/Llama-3.2-1B", cache_dir=tmp_path)


# Every refused field names itself.

def _base(**changes):
  d = dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2)
  return {**d, **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gemma2"), "model_type 'gemma2' is not supported (only 'llama', 'mistral', 'qwen2', 'qwen3')"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}),
     "rope_scaling type 'dynamic' is not supported"),
    (dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "rope_scaling of type 'llama3' lacks low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported (only 'silu', SwiGLU)"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor < 1 is not supported"),
    (dict(quantization_config={"quant_method": "awq"}), "quantization_config (awq) is not supported"),
    (dict(attention_dropout=0.1), "attention_dropout=0.1 is not supported"),
    (dict(mlp_bias=True), "mlp_bias=true is not supported for model_type 'qwen2'"),
    (dict(model_type="mistral", attention_bias=True), "attention_bias=true is not supported for model_type 'mistral'"),
    (dict(use_sliding_window=True, sliding_window=8, layer_types=["chunked_attention"] * 2),
     "layer_types ['chunked_attention'] are not supported"),
    (dict(model_type="mistral", sliding_window=0), "sliding_window=0 is not a positive whole number"),
    (dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"]),
     "layer_types=['sliding_attention'] must name one of full_attention, sliding_attention for each of the 2 layers"),
])
def test_refused_config_fields_are_named(changes, message):
  with pytest.raises(ModelError) as e:
    LlamaConfig.from_hf_dict(_base(**changes), "cfg.json")
  assert str(e.value).startswith("cfg.json: ") and message in str(e.value), str(e.value)


def test_accepted_but_inactive_fields():
  """Qwen's sliding window is off unless use_sliding_window; Mistral's null window is no window."""
  assert LlamaConfig.from_hf_dict(_base(sliding_window=4096, max_window_layers=0)).sliding_window is None
  assert LlamaConfig.from_hf_dict(_base(model_type="mistral", sliding_window=None)).sliding_window is None
  with pytest.raises(ModelError, match=r"rope_freq_factors \(llama.cpp rope_freqs\) have no Hugging Face config"):
    dataclasses.replace(LlamaConfig.from_hf_dict(_base()), rope_freq_factors=(1.0,) * 8).to_hf_dict()


def test_sharding_names_of_the_new_weights(family):
  """Biases split like their projection's output axis, per-head norms stay whole; every variable gets a sharding."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from clclm_jax.train import sharding  # pylint: disable=g-import-not-at-top
  _, _, model, _ = family
  attn, mlp = model.layers.self_attn, model.layers.mlp
  specs = {name: sharding._variable_spec(v) for name, v in (
      ("q_bias", attn.q_proj.bias), ("o_bias", attn.o_proj.bias), ("down_bias", mlp.down_proj.bias),
      ("q_norm", attn.q_norm and attn.q_norm.weight)) if v is not None}
  expected = {"q_bias": P(None, "tensor"), "o_bias": P(None, "fsdp"), "down_bias": P(None, "fsdp"),
              "q_norm": P(None, None)}
  assert specs == {k: expected[k] for k in specs}
  assert len(specs) == {"llama3": 3, "qwen2": 1, "qwen2_sliding": 1, "qwen3": 1, "mistral": 0}[family[0]]
  sharding.state_sharding(nnx.state(model), sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
