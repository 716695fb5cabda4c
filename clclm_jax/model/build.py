"""The model and tokenizer a config names: a checkpoint (`model.source`) or a random model of a preset's shape
(`model.preset`, with the SmolLM2 or a byte tokenizer), with LoRA, optionally started from a PEFT adapter."""

import dataclasses
import functools
import json
import pathlib

import jax
from flax import nnx
from ml_collections import ConfigDict
import transformers

from clclm_jax.model import loading, lora, peft
from clclm_jax.model.config import LoraConfig, presets
from clclm_jax.model.llama import Llama
from clclm_jax.train.errors import ConfigError


def smollm2_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """The SmolLM2 tokenizer alone, cached as tokenizer.json in CLCLM_CACHE (~/.cache/clclm_jax)."""
  cache = loading.cache_root() / "smollm2-tokenizer"
  if not (cache / "tokenizer.json").is_file():
    import gguf  # pylint: disable=g-import-not-at-top
    path = loading.smollm2_gguf()
    loading.gguf_tokenizer(gguf.GGUFReader(str(path)), path).save_pretrained(cache)
  return transformers.PreTrainedTokenizerFast.from_pretrained(cache)


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """UTF-8 bytes as tokens (256) plus <s> and </s>: a 258-token vocabulary for tiny test models."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<s>", "</s>"])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="</s>")


@functools.partial(nnx.jit, static_argnums=(0, 1), static_argnames=("dtype", "quantize", "seed"))
def random_model(cfg, lora_cfg: LoraConfig, *, dtype, quantize, seed: int) -> Llama:
  """A random `Llama` with LoRA, built in one compiled call (eagerly, every op and shape compiles apart)."""
  model = Llama(cfg, dtype=dtype, quantize=quantize, rngs=nnx.Rngs(seed))
  return lora.add_lora(model, lora_cfg, jax.random.key(seed))


def build_model(config: ConfigDict):
  """(model with LoRA, tokenizer) from `config.model` and `config.lora`."""
  m, lc = config.model, config.lora
  lora_cfg = LoraConfig(r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets))
  if m.preset:  # A random model of a preset's shape, with the vocabulary of `model.tokenizer`.
    tokenizers = {"bytes": byte_tokenizer, "smollm2": smollm2_tokenizer}
    if m.tokenizer not in tokenizers:
      raise ConfigError(f"config.model.tokenizer={m.tokenizer!r}: use one of {sorted(tokenizers)}")
    tokenizer = tokenizers[m.tokenizer]()
    cfg = dataclasses.replace(presets[m.preset], vocab_size=len(tokenizer),
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = random_model(cfg, lora_cfg, dtype=loading.DTYPES[m.dtype], quantize=m.quantize or None, seed=config.seed)
  else:
    model, tokenizer = loading.load_model(m.source, dtype=m.dtype, quantize=m.quantize or None,
                                          lora=lora_cfg, lora_seed=config.seed)
    if tokenizer is None:
      raise ConfigError(f"config.model.source={m.source!r}: the folder holds no tokenizer (tokenizer.json, "
                        "tokenizer.model or tokenizer_config.json): copy the tokenizer files of its base model there")
  model.remat, model.attention_impl = m.remat, m.attention_impl
  if lc.init_from:
    check_adapter(config, lc.init_from)
    peft.load_peft(model, lc.init_from)
  return model, tokenizer


def check_adapter(config: ConfigDict, adapter_dir: str) -> None:
  """Refuses a PEFT adapter (`lora.init_from`) of another rank, alpha or targets than `config.lora`: it would
  train at the adapter's shape while the run records the config's, and scoring would then fail."""
  path = pathlib.Path(adapter_dir) / peft.CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f"config.lora.init_from={adapter_dir!r}: no {peft.CONFIG_FILE} there (a PEFT adapter folder)")
  saved, lc = json.loads(path.read_text()), config.lora
  pairs = [("r", "r", lc.r), ("alpha", "lora_alpha", lc.alpha)]
  diff = [f"lora.{name}: {saved.get(key)!r} in the adapter, {value!r} in the config" for name, key, value in pairs
          if saved.get(key) is not None and float(saved[key]) != float(value)]
  targets = saved.get("target_modules")
  if targets is not None and sorted(targets) != sorted(lc.targets):
    diff.append(f"lora.targets: {sorted(targets)} in the adapter, {sorted(lc.targets)} in the config")
  if diff:
    raise ConfigError(f"config.lora.init_from={adapter_dir!r} does not fit the config ({'; '.join(diff)}): set "
                      "the config's lora fields to the adapter's")
