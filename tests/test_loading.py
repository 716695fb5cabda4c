"""Checkpoint loading: SmolLM2 GGUF against transformers' own GGUF reader, tiny GGUF files, errors."""

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from clclm_jax.data.prompts import template
from clclm_jax.model import loading, quant
from clclm_jax.model.config import presets
from clclm_jax.model.errors import ModelError
from clclm_jax.model.loading import load_model
from test_model import TOKENS, hf_logits, save_tiny_hf


@pytest.fixture(scope="module")
def prompts(data_root):
  records = json.loads((data_root / "tallrec" / "movie" / "test.json").read_text())
  return [template("alpaca").prompt(r["instruction"], r["input"]) for r in records]


@pytest.fixture(scope="module")
def smollm2():
  return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda model, tokens, mask: model(tokens, attention_mask_bt=mask))


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf(smollm2, prompts, forward):
  model, tokenizer = smollm2
  path = loading.smollm2_gguf()
  assert model.config == presets["smollm2-135m"]
  theirs_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  ours_ids = tokenizer(prompts)["input_ids"]
  theirs_ids = theirs_tok(prompts)["input_ids"]
  assert len(ours_ids) == 1000
  assert [i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids)) if a != b] == []
  assert tokenizer.decode(ours_ids[0]) == prompts[0]
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32).eval()
  tokens = np.asarray([ours_ids[0]])
  ours = np.asarray(forward(model, jnp.asarray(tokens), jnp.ones_like(tokens)))
  diff = np.abs(ours - hf_logits(hf, tokens)).max()
  print(f"SmolLM2 GGUF logits max |ours - transformers| = {diff:.2e} over {tokens.shape[1]} tokens")
  assert diff <= 1e-3


@pytest.mark.slow
def test_smollm2_int8_agrees_with_float(smollm2, prompts):
  model, tokenizer = smollm2
  model8 = quant.quantize_model(nnx.clone(model))
  assert quant.model_bytes(model8) < 0.5 * quant.model_bytes(model)  # Embeddings stay float32.

  @nnx.jit
  def compare(model, model8, tokens, mask):
    lg, lg8 = model(tokens, attention_mask_bt=mask), model8(tokens, attention_mask_bt=mask)
    real = mask[..., None].astype(jnp.float32)
    agree = ((lg.argmax(-1) == lg8.argmax(-1)) * mask).sum()
    return agree, (((lg8 - lg) * real) ** 2).sum(), ((lg * real) ** 2).sum()

  # 10 prompts, 2,180 tokens (a 1% disagreement is 22 of them): the two forwards of the 135M model are this test's
  # cost (50 prompts took two minutes); the prompts share their first 71 tokens (the instruction), which more prompts
  # only repeat. On these GGUF weights (Q4_1) the agreement was 1.0000 on 10 and on 50 prompts alike.
  n = 10
  batch = tokenizer(prompts[:n], padding="longest", return_tensors="np")
  tokens, mask = batch["input_ids"], batch["attention_mask"]
  sums = np.zeros(3)
  for s in range(0, n, 10):
    sums += np.asarray(compare(model, model8, jnp.asarray(tokens[s:s + 10]), jnp.asarray(mask[s:s + 10])))
  rate = sums[0] / mask.sum()
  print(f"int8 vs float32 on {n} TALLRec prompts ({mask.sum()} tokens): argmax agreement {rate:.4f}, "
        f"relative logits error {np.sqrt(sums[1] / sums[2]):.4f}")
  assert rate >= 0.99


def write_tiny_gguf(path, hf, arch="llama", qtype=gguf.GGMLQuantizationType.F32):
  """A llama.cpp-style GGUF of a tiny HF model: Q/K rows permuted, tensors in `qtype`."""
  cfg = hf.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_tokenizer_model("gpt2")
  tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab"] + [f"x{i}" for i in range(6, cfg.vocab_size)]
  w.add_token_list(tokens)
  w.add_token_types([3] * 3 + [1] * (cfg.vocab_size - 3))
  w.add_token_merges(["a b"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  names = {v: k for k, v in loading._GGUF_NAMES.items()}
  for name, p in hf.state_dict().items():
    x = p.float().numpy()
    parts = name.split(".")
    if name.startswith("model.layers."):
      block, leaf = ".".join(parts[3:-1]), parts[-1]
      if parts[-2] in ("q_proj", "k_proj"):
        heads = cfg.num_attention_heads if parts[-2] == "q_proj" else cfg.num_key_value_heads
        x = x.reshape(heads, 2, x.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(x.shape)
      gname = f"blk.{parts[2]}.{names[block]}.{leaf}"
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}[name]
    if x.ndim == 2 and qtype == gguf.GGMLQuantizationType.IQ4_NL:  # No Python quantiser: zero bytes.
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      w.add_tensor(gname, np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8), raw_dtype=qtype)
    elif x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(gname, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_gguf")
  return save_tiny_hf(path, tie=False, seed=2), path


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_tiny_gguf_matches_transformers_gguf(tiny_hf, tmp_path, qtype):
  hf, _ = tiny_hf
  write_tiny_gguf(tmp_path / "tiny.gguf", hf, qtype=gguf.GGMLQuantizationType[qtype])
  model, tokenizer = load_model(tmp_path / "tiny.gguf")
  assert model.config == presets["tiny"]
  assert tokenizer("ab</s>")["input_ids"] == [5, 2]
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
  ours = np.asarray(model(jnp.asarray(TOKENS)))
  np.testing.assert_allclose(ours, hf_logits(theirs, TOKENS), atol=1e-4, rtol=0)
  if qtype == "F32":  # Lossless: the Q/K permutation round trip gives back the original model.
    np.testing.assert_allclose(ours, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_unsupported_gguf_quant_type(tiny_hf, tmp_path):
  write_tiny_gguf(tmp_path / "q.gguf", tiny_hf[0], qtype=gguf.GGMLQuantizationType.IQ4_NL)
  with pytest.raises(ModelError, match=r"q.gguf: tensor token_embd.weight has quant type IQ4_NL, supported: F32"):
    load_model(tmp_path / "q.gguf")


def test_unsupported_gguf_architecture(tiny_hf, tmp_path):
  write_tiny_gguf(tmp_path / "g.gguf", tiny_hf[0], arch="gpt2")
  with pytest.raises(ModelError, match=r"g.gguf: GGUF architecture 'gpt2' is not supported"):
    load_model(tmp_path / "g.gguf")


def test_corrupt_gguf(tmp_path):
  (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
  with pytest.raises(ModelError, match=r"bad.gguf: corrupt or unreadable GGUF file"):
    load_model(tmp_path / "bad.gguf")


def test_hf_folder_errors(tiny_hf, tmp_path):
  with pytest.raises(ModelError, match=r"nowhere: not found, or neither a Hugging Face folder nor a .gguf"):
    load_model(tmp_path / "nowhere")
  with pytest.raises(ModelError, match=r"config.json: missing"):
    load_model(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ModelError, match=r"config.json: unreadable LLaMA config"):
    load_model(tmp_path)
  cfg = json.loads((tiny_hf[1] / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gemma2")))
  with pytest.raises(ModelError, match=r"config.json: model_type 'gemma2' is not supported"):
    load_model(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelError, match=r"no \*.safetensors weights"):
    load_model(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
  with pytest.raises(ModelError, match=r"model.safetensors: corrupt or unreadable safetensors file"):
    load_model(tmp_path)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"model.embed_tokens.weight": np.zeros((256, 64), np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ModelError, match=r"weight model.layers.0.self_attn.q_proj.weight is missing"):
    load_model(tmp_path)
  save_file({"model.embed_tokens.weight": np.zeros((255, 64), np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ModelError, match=r"model.embed_tokens.weight has shape \(255, 64\), expected \(256, 64\)"):
    load_model(tmp_path)


def test_bad_options(tiny_hf):
  with pytest.raises(ModelError, match=r"dtype 'float16' is not supported"):
    load_model(tiny_hf[1], dtype="float16")
  with pytest.raises(ModelError, match=r"quantize='int4' is not supported"):
    load_model(tiny_hf[1], quantize="int4")


def test_checksum_mismatch(tmp_path):
  (tmp_path / loading.SMOLLM2_FILE).write_bytes(b"not the model")
  with pytest.raises(ModelError, match=r"sha256 .* does not match b179c952"):
    loading._verified(tmp_path / loading.SMOLLM2_FILE)
