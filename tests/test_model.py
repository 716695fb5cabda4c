"""Llama forward parity with transformers on tiny random checkpoints, masks, packing, LoRA, int8."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from clclm_jax.model import config as config_lib
from clclm_jax.model.errors import ModelError
from clclm_jax.model.llama import (Frozen, Llama, QInt8, QScale, attend, attention, causal_query_block, dropout, frozen_matmul,
                                   linear_cross_entropy, mask_and_positions, swiglu)
from clclm_jax.model.loading import load_model
from clclm_jax.model.lora import add_lora, merge_lora
from clclm_jax.model import quant
from clclm_jax.model.quant import dequantize, quantize_int8


def save_tiny_hf(path, tie: bool, seed: int = 0):
  """A random GQA LlamaForCausalLM saved with `save_pretrained`; returns the torch model."""
  torch.manual_seed(seed)
  cfg = config_lib.presets["tiny"]
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
      rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=tie, initializer_range=0.2)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # Non-trivial norm weights so a wrong norm layout shows.
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  hf.save_pretrained(path)
  return hf


def hf_logits(hf, tokens_bt, mask_bt=None, positions_bt=None):
  kw = {}
  if mask_bt is not None:
    kw["attention_mask"] = torch.tensor(np.asarray(mask_bt))
  if positions_bt is not None:
    kw["position_ids"] = torch.tensor(np.asarray(positions_bt))
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens_bt)), **kw).logits.float().numpy()


def save_peft_adapter(hf, targets: list[str], out, r: int = 2, alpha: int = 6):
  """A PEFT LoRA adapter on `hf` (B drawn at random so the adapter acts), saved to `out`; the PEFT model."""
  import peft  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
  theirs = peft.get_peft_model(hf, cfg).eval()
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if "lora_B" in name:
        p.copy_(0.05 * torch.randn_like(p))
  theirs.save_pretrained(out)
  return theirs


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny")
  hf = save_tiny_hf(path, tie=request.param)
  model, tokenizer = load_model(path)
  assert tokenizer is None
  return hf, model, path


TOKENS = np.random.default_rng(0).integers(3, 256, size=(3, 11))


def test_parity_with_transformers(tiny):
  hf, model, _ = tiny
  ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS)))
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_parity_left_padding(tiny):
  hf, model, _ = tiny
  mask = np.ones_like(TOKENS)
  mask[0, :4] = 0
  mask[1, :1] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ours = np.asarray(model(jnp.asarray(TOKENS), attention_mask_bt=jnp.asarray(mask)))
  theirs = hf_logits(hf, TOKENS, mask, positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
  # Left padding changes nothing for the real tokens: row 0 equals its unpadded suffix.
  alone = np.asarray(model(jnp.asarray(TOKENS[:1, 4:])))
  np.testing.assert_allclose(ours[0, 4:], alone[0], atol=1e-4, rtol=0)


def test_packed_segments_match_separate_sequences(tiny):
  _, model, _ = tiny
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 2])
  packed = np.asarray(model(jnp.asarray(TOKENS[:1, :11]), attention_mask_bt=jnp.asarray(seg)))
  first = np.asarray(model(jnp.asarray(TOKENS[:1, :5])))
  second = np.asarray(model(jnp.asarray(TOKENS[:1, 5:9])))
  np.testing.assert_allclose(packed[0, :5], first[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[0, 5:9], second[0], atol=1e-5, rtol=0)


def test_api_pieces_agree(tiny):
  _, model, _ = tiny
  tokens = jnp.asarray(TOKENS)
  h = model.hidden_states(tokens)
  np.testing.assert_allclose(model.lm_logits(h), model(tokens), atol=1e-6)
  np.testing.assert_allclose(model(None, inputs_embeds_btd=model.embed(tokens)), model(tokens), atol=1e-6)


def test_rows_b_runs_one_query_in_the_last_layer_and_matches_the_full_forward(tiny):
  _, model, _ = tiny
  tokens = jnp.asarray(TOKENS)
  mask = jnp.asarray(np.arange(11)[None] < np.array([[11], [7], [9]]), jnp.int32)
  rows = jnp.array([10, 6, 5])
  full = model.hidden_states(tokens, attention_mask_bt=mask)
  picked = model.hidden_states(tokens, attention_mask_bt=mask, rows_b=rows)
  assert picked.shape == (3, model.config.hidden_size)
  np.testing.assert_allclose(picked, full[jnp.arange(3), rows], atol=1e-5)
  cache = model.prefix_cache(tokens[0, :4])
  rest, rest_mask = jnp.broadcast_to(tokens[0, 4:], (3, 7)), mask[:, 4:]
  full_p = model.hidden_states(rest, attention_mask_bt=rest_mask, prefix_kv=cache)
  picked_p = model.hidden_states(rest, attention_mask_bt=rest_mask, prefix_kv=cache, rows_b=rows - 4)
  np.testing.assert_allclose(picked_p, full_p[jnp.arange(3), rows - 4], atol=1e-5)
  np.testing.assert_allclose(picked_p[0], full[0, 10], atol=1e-5)


def test_bfloat16_close_to_float32(tiny):
  _, model32, path = tiny
  model16, _ = load_model(path, dtype="bfloat16")
  assert model16.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  lg16 = np.asarray(model16(jnp.asarray(TOKENS)))
  lg32 = np.asarray(model32(jnp.asarray(TOKENS)))
  assert lg16.dtype == np.float32
  assert np.abs(lg16 - lg32).max() < 0.05 * np.abs(lg32).max()


def test_variable_types_decide_what_trains():
  model = Llama(config_lib.presets["tiny"], quantize="int8", rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(model, nnx.Param))
  add_lora(model, config_lib.LoraConfig(r=4, targets=("q_proj", "down_proj")), jax.random.key(0))
  trainable = nnx.state(model, nnx.Param)
  assert len(jax.tree.leaves(trainable)) == 2 * 2  # targets x (A, B), each stacked over the layers
  q = model.layers.self_attn.q_proj
  assert isinstance(q.kernel, QInt8) and q.kernel[...].dtype == jnp.int8 and q.kernel.shape == (2, 64, 64)
  assert isinstance(q.scale, QScale) and isinstance(model.norm.weight, Frozen)
  assert q.scale.shape == (2, 2, 64) and model.layers.input_layernorm.weight.shape == (2, 64)
  assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
  assert q.lora_a.shape == (2, 64, 4) and q.lora_b.shape == (2, 4, 64)
  specs = nnx.get_partition_spec(nnx.state(model))
  assert specs["layers"]["mlp"]["down_proj"]["kernel"].get_value() == jax.P("layers", "mlp", "embed")
  assert specs["layers"]["post_attention_layernorm"]["weight"].get_value() == jax.P("layers", "norm")
  assert specs["norm"]["weight"].get_value() == jax.P("norm")
  assert specs["embed_tokens"]["embedding"].get_value() == jax.P("vocab", "embed")


def _randomize_lora(model, key):
  for j, (_, lin) in enumerate(model.projections()):
    if lin.lora_b is not None:
      lin.lora_b.set_value(0.03 * jax.random.normal(jax.random.fold_in(key, j), lin.lora_b.shape))


def test_lora_zero_b_is_base_and_merge_is_exact(tiny):
  _, _, path = tiny
  lora = config_lib.LoraConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"))
  base, _ = load_model(path)
  model, _ = load_model(path, lora=lora)
  tokens = jnp.asarray(TOKENS)
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(base(tokens)))
  _randomize_lora(model, jax.random.key(1))
  adapted = np.asarray(model(tokens))
  assert np.abs(adapted - np.asarray(base(tokens))).max() > 1e-3
  dropped = np.asarray(model(tokens, dropout_key=jax.random.key(2)))
  assert np.abs(dropped - adapted).max() > 1e-4


def test_dropout_drops_at_the_rate_scales_kept_values_and_is_fixed_by_the_key():
  x = jnp.ones((4, 64, 577), jnp.float32)  # odd width: the last half-draw is cut
  y = np.asarray(dropout(jax.random.key(0), x, 0.05))
  kept = 1 - 3277 / 65536  # the rate rounded to 16 bits
  tol = 4 * np.sqrt(0.05 * 0.95 / y[..., :289].size)
  for part in (y[..., :289], y[..., 289:]):  # low and high halves of the 32-bit draws
    assert abs((part == 0).mean() - 0.05) < tol
  np.testing.assert_allclose(y[y != 0], 1 / kept, rtol=1e-6)
  np.testing.assert_array_equal(y, np.asarray(dropout(jax.random.key(0), x, 0.05)))
  assert (y != np.asarray(dropout(jax.random.key(1), x, 0.05))).any()
  assert dropout(jax.random.key(0), x.astype(jnp.bfloat16), 0.05).dtype == jnp.bfloat16


def test_merge_lora_equals_unmerged():
  # Standard 0.02 init: the 0.2-init parity models amplify float32 reassociation past 1e-5.
  model = Llama(config_lib.presets["tiny"], rngs=nnx.Rngs(0))
  add_lora(model, config_lib.LoraConfig(r=4, alpha=8.0, targets=config_lib.LORA_TARGETS), jax.random.key(0))
  tokens = jnp.asarray(TOKENS)
  base = np.asarray(model(tokens))
  _randomize_lora(model, jax.random.key(1))
  adapted = np.asarray(model(tokens))
  assert np.abs(adapted - base).max() > 1e-3
  merge_lora(model)
  assert not jax.tree.leaves(nnx.state(model, nnx.Param))
  assert model.lora_config is None
  merged = np.asarray(model(tokens))
  np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)


def test_int8_forward_equals_float_forward_on_dequantised_weights(tiny):
  _, _, path = tiny
  model8, _ = load_model(path, quantize="int8")
  dequantised, _ = load_model(path)
  pairs = list(zip(dequantised.projections(), model8.projections()))
  for (_, lin_f), (_, lin_q) in pairs:
    lin_f.set_kernel(lin_q.weight())
  if model8.lm_head is not None:
    dequantised.lm_head.set_kernel(model8.lm_head.weight())
  tokens = jnp.asarray(TOKENS)
  np.testing.assert_allclose(np.asarray(model8(tokens)), np.asarray(dequantised(tokens)), atol=1e-4, rtol=0)
  requantised = quant.quantize_model(load_model(path)[0])
  np.testing.assert_array_equal(np.asarray(requantised(tokens)), np.asarray(model8(tokens)))


def test_quantize_int8_rounds_to_half_a_step():
  w_io = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.linspace(0.01, 2.0, 32)
  q_io, scale_go, zero_go = quantize_int8(w_io)
  assert q_io.dtype == jnp.int8 and scale_go.shape == zero_go.shape == (2, 32)
  assert int(q_io.min()) == -128 and int(q_io.max()) == 127
  step_io = jnp.repeat(scale_go, 32, axis=0)
  assert bool(jnp.all(jnp.abs(dequantize(q_io, scale_go, zero_go) - w_io) <= step_io * 0.501))


def test_quantize_int8_is_lossless_on_a_4bit_grid():
  k_io = jax.random.randint(jax.random.key(1), (64, 8), 0, 16).at[0].set(0).at[1].set(15)
  w_io = 0.37 * k_io - 1.1
  np.testing.assert_allclose(dequantize(*quantize_int8(w_io)), w_io, atol=1e-6, rtol=0)


def test_lora_config_rejects_unknown_target():
  with pytest.raises(ModelError, match=r"LoRA target\(s\) \['qkv'\] unknown: choose from q_proj"):
    config_lib.LoraConfig(targets=("q_proj", "qkv"))


def test_from_hf_dict_rejects_other_architectures():
  with pytest.raises(ModelError, match="cfg.json: model_type 'gemma2' is not supported"):
    config_lib.LlamaConfig.from_hf_dict({"model_type": "gemma2"}, "cfg.json")


def test_frozen_matmul_backward_is_one_dot_in_the_weight_dtype():
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32), jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  ref = jax.grad(loss(lambda x, w: x @ w))(x, w)
  np.testing.assert_allclose(jax.grad(loss(frozen_matmul))(x, w), ref, rtol=1e-6)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  out = frozen_matmul(xb, wb)
  assert out.dtype == jnp.float32  # accumulated in float32
  gb = jax.grad(loss(frozen_matmul))(xb, wb)
  assert gb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gb, np.float32), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_remat_changes_no_loss_or_gradient_and_checkpoints_each_layer(scan_layers):
  model = Llama(config_lib.presets["tiny"], quantize="int8", scan_layers=scan_layers, rngs=nnx.Rngs(0))
  add_lora(model, config_lib.LoraConfig(r=4, targets=("q_proj", "up_proj")), jax.random.key(0))
  _randomize_lora(model, jax.random.key(1))
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  tokens = jnp.asarray(TOKENS)

  def loss(params, remat):
    m = nnx.merge(graphdef, params, frozen)
    m.remat = remat
    return jnp.mean(jax.nn.log_softmax(m(tokens, dropout_key=jax.random.key(3)))[..., 7])

  policies = (False, True, "full", "dots")
  outs = {r: jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r) for r in policies}
  for r in policies[1:]:
    np.testing.assert_allclose(outs[r][0], outs[False][0], rtol=1e-6)
    for g1, g0 in zip(jax.tree.leaves(outs[r][1]), jax.tree.leaves(outs[False][1])):
      assert np.abs(np.asarray(g0)).max() > 0
      np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-7)
  remats = {r: _count_remat(jax.make_jaxpr(loss, static_argnums=1)(params, r).jaxpr) for r in policies}
  per_layer = 1 if scan_layers else model.config.num_hidden_layers  # the scanned body is checkpointed once
  assert remats == {False: 0, True: per_layer, "full": per_layer, "dots": per_layer}
  with pytest.raises(ModelError, match="remat='some' is not one of"):
    loss(params, "some")


def _count_remat(jaxpr) -> int:
  """Checkpointed sub-computations (`jax.checkpoint` equations) anywhere in a jaxpr."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in ("checkpoint", "remat2")
    n += sum(_count_remat(getattr(v, "jaxpr", v)) for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr"))
  return n


def _reference_attention(q_btkgd, k_bskd, v_bskd, allowed_bts):
  scores = jnp.einsum("btkgd,bskd->bkgts", q_btkgd.astype(jnp.float32), k_bskd.astype(jnp.float32))
  probs = jax.nn.softmax(jnp.where(allowed_bts[:, None, None], scores, -jnp.inf), axis=-1)
  probs = jnp.where(allowed_bts.any(-1)[:, None, None, :, None], probs, 1.0 / k_bskd.shape[1])  # no key: uniform
  return jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd.astype(jnp.float32))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attend_values_and_gradients_match_plain_softmax_attention(dtype, tol):
  b, t, s, k, g, d = 2, 5, 7, 2, 3, 4
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.normal(size=shape), dtype) for shape in ((b, t, k, g, d), (b, s, k, d), (b, s, k, d)))
  allowed = jnp.asarray(rng.random((b, t, s)) < 0.6).at[1, 2].set(False)  # row 1, query 2 sees no key
  w = jnp.asarray(rng.normal(size=(b, t, k, g, d)), jnp.float32)
  loss = lambda f: lambda q, kk, v: jnp.sum(f(q, kk, v, allowed).astype(jnp.float32) * w)  # noqa: E731
  np.testing.assert_allclose(np.asarray(attend(q, kk, v, allowed), np.float32),
                             _reference_attention(q, kk, v, allowed), atol=tol, rtol=tol)
  got = jax.grad(loss(attend), argnums=(0, 1, 2))(q, kk, v)
  want = jax.grad(loss(_reference_attention), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, kk, v)))
  for g_, w_ in zip(got, want):
    assert g_.dtype == dtype
    np.testing.assert_allclose(np.asarray(g_, np.float32), w_, atol=tol * 4, rtol=tol * 4)
  assert float(jnp.abs(got[0][1, 2]).max()) == 0.0  # a query that sees no key gets no gradient


@pytest.mark.parametrize("prefix", [0, 3])
def test_attend_in_causal_blocks_matches_one_block(prefix):
  """Query blocks against the keys up to their last query give one block's values and gradients, with a
  prefix, right padding and packed segments (padded queries carry no loss, as in training)."""
  b, t, k, g, d = 3, 11, 2, 2, 4
  seg = jnp.asarray([[1] * 11, [1] * 8 + [0] * 3, [1] * 5 + [2] * 6])
  allowed = jnp.concatenate([jnp.ones((b, t, prefix), bool), mask_and_positions(seg)[0]], axis=-1)
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
              for shape in ((b, t, k, g, d), (b, prefix + t, k, d), (b, prefix + t, k, d)))
  w = jnp.asarray(rng.normal(size=(b, t, k, g, d)), jnp.float32) * (seg > 0)[:, :, None, None, None]

  @functools.partial(jax.jit, static_argnums=0)
  def run(block):
    out, vjp = jax.vjp(lambda *x: attend(*x, allowed, block), q, kk, v)
    return out * (w != 0), vjp(w)

  want_out, want_grads = run(None)
  for block in (2, 3, 4, 10):
    out, grads = run(block)
    np.testing.assert_allclose(out, want_out, atol=1e-6)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, atol=1e-5)
  assert [causal_query_block(t) for t in (1, 64, 65, 160, 256, 512, 2048)] == [None, None, 64, 64, 64, 128, 512]


def test_attend_backward_keeps_no_probabilities():
  """The residuals saved for the backward pass hold no `[b, k, g, t, s]` tensor."""
  b, t, k, g, d = 2, 64, 1, 2, 8
  q, kk, v = jnp.ones((b, t, k, g, d)), jnp.ones((b, t, k, d)), jnp.ones((b, t, k, d))
  allowed = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
  _, vjp = jax.vjp(lambda q, kk, v: attend(q, kk, v, allowed), q, kk, v)
  saved = [x.shape for x in jax.tree.leaves(vjp)]
  assert (b, k, g, t, t) not in saved and saved.count((b, k, g, t)) == 2  # row max and log-sum


def test_swiglu_gradient_matches_autodiff_and_saves_only_its_inputs():
  rng = np.random.default_rng(0)
  gate, up, w = (jnp.asarray(rng.normal(size=(3, 5, 7)) * 3, jnp.float32) for _ in range(3))
  plain = lambda g, u, dtype: (jax.nn.silu(g) * u).astype(dtype)  # noqa: E731
  for dtype in (jnp.float32, jnp.bfloat16):
    got, want = (jax.grad(lambda g, u, f=f: jnp.sum(f(g, u, dtype).astype(jnp.float32) * w), (0, 1))(gate, up)
                 for f in (swiglu, plain))
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  _, vjp = jax.vjp(lambda g, u: swiglu(g, u, jnp.bfloat16), gate, up)
  assert len(jax.tree.leaves(vjp)) == 2


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_linear_cross_entropy_matches_logits_then_softmax_ce(dtype, tol):
  rng = np.random.default_rng(0)
  h, w = jnp.asarray(rng.normal(size=(13, 6)), dtype), jnp.asarray(rng.normal(size=(6, 11)), dtype)
  targets, g = jnp.asarray(rng.integers(0, 11, 13)), jnp.asarray(rng.normal(size=13), jnp.float32)
  plain = lambda h: optax.softmax_cross_entropy_with_integer_labels(frozen_matmul(h, w), targets)  # noqa: E731
  fused = lambda h: linear_cross_entropy(h, w, targets, 4)  # noqa: E731  13 rows: 4 chunks, the last padded
  np.testing.assert_allclose(fused(h), plain(h), rtol=tol, atol=tol)
  got, want = (jax.grad(lambda h, f=f: jnp.sum(f(h) * g))(h) for f in (fused, plain))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("tie", [True, False])
def test_token_nll_equals_ce_of_lm_logits(tie):
  cfg = dataclasses.replace(config_lib.presets["tiny"], tie_word_embeddings=tie)
  model = Llama(cfg, quantize="int8", rngs=nnx.Rngs(0))
  h = jnp.asarray(np.random.default_rng(1).normal(size=(9, cfg.hidden_size)), jnp.float32)
  targets = jnp.arange(9) * 7
  np.testing.assert_allclose(model.token_nll(h, targets, chunk=4),
                             optax.softmax_cross_entropy_with_integer_labels(model.lm_logits(h), targets), rtol=1e-5)


def _lora_model(layers: int = 3, **kw) -> Llama:
  """A float32 tiny-width model with `layers` decoder layers and random LoRA on every projection."""
  cfg = dataclasses.replace(config_lib.presets["tiny"], num_hidden_layers=layers)
  model = Llama(cfg, rngs=nnx.Rngs(0), **kw)
  add_lora(model, config_lib.LoraConfig(r=4, dropout=0.1, targets=config_lib.LORA_TARGETS), jax.random.key(0))
  _randomize_lora(model, jax.random.key(1))
  return model


def _run_as(model, fn, **attrs):
  """`fn(model)` jitted, on a copy of `model` with attributes (`scan_layers`, `attention_impl`) changed."""
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def run(params):
    m = nnx.merge(graphdef, params, frozen)
    for k, v in attrs.items():
      setattr(m, k, v)
    return fn(m)

  return run(params)


def _lora_grads(model, tokens, mask, **attrs):
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(*tokens.shape, model.config.vocab_size)), jnp.float32)

  def loss(params):
    m = nnx.merge(graphdef, params, frozen)
    for k, v in attrs.items():
      setattr(m, k, v)
    logits = m(tokens, attention_mask_bt=mask, dropout_key=jax.random.key(5))
    return jnp.sum(jax.nn.log_softmax(logits) * w * (mask > 0)[..., None])

  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close_at_scale(got, want, tol: float = 1e-5):
  """Equal up to `tol` times the largest |want|: float32 reassociation of a sum over 33 x 256 logits."""
  got, want = np.asarray(got), np.asarray(want)
  assert np.abs(got - want).max() <= tol * np.abs(want).max(), (np.abs(got - want).max(), np.abs(want).max())


PAD_MASK = np.array([[1] * 11, [0] * 4 + [1] * 7, [0] + [1] * 10])  # left padding
SEG_MASK = np.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11, [1] * 3 + [2] * 3 + [3] * 5])  # packing


@pytest.mark.parametrize("mask", [PAD_MASK, SEG_MASK], ids=["left_padding", "packed"])
def test_scan_and_unrolled_layers_give_equal_logits_and_lora_gradients(mask):
  model = _lora_model()
  tokens, mask = jnp.asarray(TOKENS), jnp.asarray(mask)
  forward = lambda m: m(tokens, attention_mask_bt=mask, dropout_key=jax.random.key(4))  # noqa: E731
  scan, unrolled = (_run_as(model, forward, scan_layers=s) for s in (True, False))
  real = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(scan)[real], np.asarray(unrolled)[real], atol=1e-5, rtol=0)
  (l1, g1), (l0, g0) = (_lora_grads(model, tokens, mask, scan_layers=s) for s in (True, False))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert a.shape[0] == model.config.num_hidden_layers and np.abs(np.asarray(b)).max() > 0
    _assert_close_at_scale(a, b)


def test_scan_and_unrolled_layers_agree_with_prefix_kv_and_rows_b():
  model = _lora_model()
  tokens = jnp.asarray(TOKENS)
  mask = jnp.asarray(np.arange(11)[None] < np.array([[11], [7], [9]]), jnp.int32)
  rows = jnp.array([6, 2, 4])

  def prefixed(m):
    cache = m.prefix_cache(tokens[0, :4])
    rest = jnp.broadcast_to(tokens[0, 4:], (3, 7))
    return cache, m.hidden_states(rest, attention_mask_bt=mask[:, 4:], prefix_kv=cache, rows_b=rows)

  (cache1, h1), (cache0, h0) = (_run_as(model, prefixed, scan_layers=s) for s in (True, False))
  assert cache1[0].shape == (3, 1, 4, 2, 16)  # [layers, 1, prefix, kv_heads, head_dim]
  for a, b in zip(cache1, cache0):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  assert h1.shape == (3, 64)
  np.testing.assert_allclose(h1, h0, atol=1e-5, rtol=0)
  full = model.hidden_states(tokens[:1])  # row 0 continues the prefix with its own tokens: the full forward
  np.testing.assert_allclose(h1[0], full[0, rows[0] + 4], atol=1e-5, rtol=0)


def test_one_layer_model_with_rows_b():
  """With one layer and `rows_b`, the scan runs no layer and only the last (here the first) one runs."""
  model = _lora_model(layers=1)
  tokens = jnp.asarray(TOKENS)
  rows = jnp.array([10, 3, 0])
  for scan in (True, False):
    full = _run_as(model, lambda m: m.hidden_states(tokens), scan_layers=scan)
    picked = _run_as(model, lambda m: m.hidden_states(tokens, rows_b=rows), scan_layers=scan)
    np.testing.assert_allclose(picked, full[jnp.arange(3), rows], atol=1e-5, rtol=0)


CPU_ATTENTION = ("custom", "xla")  # "cudnn" needs a GPU


@pytest.mark.parametrize("impl", CPU_ATTENTION[1:])
@pytest.mark.parametrize("prefix, rows", [(0, False), (3, False), (3, True)])
def test_attention_implementations_agree_in_values_and_gradients(impl, prefix, rows):
  b, t, k, g, d = 3, 11, 2, 3, 16
  seg = jnp.asarray([[1] * 11, [0] * 3 + [1] * 8, [1] * 5 + [2] * 6])  # left padding and packing
  allowed = jnp.concatenate([jnp.ones((b, t, prefix), bool), mask_and_positions(seg)[0]], axis=-1)
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
              for shape in ((b, t, k * g, d), (b, prefix + t, k, d), (b, prefix + t, k, d)))
  if rows:  # one query per row, as the last layer runs with `rows_b` (not causal-blocked)
    pick = jnp.array([[10], [5], [7]])
    q, allowed, seg = q[jnp.arange(b)[:, None], pick], allowed[jnp.arange(b)[:, None], pick], seg[jnp.arange(b)[:, None], pick]
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * (seg > 0)[:, :, None, None]  # padded queries: no loss

  def run(name):
    out, vjp = jax.vjp(lambda *x: attention(*x, allowed, name, causal=not rows), q, kk, v)
    return out * (w != 0), vjp(w)

  want_out, want_grads = run("custom")
  out, grads = run(impl)
  np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=0)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", CPU_ATTENTION[1:])
def test_model_attention_implementations_agree(impl):
  model = _lora_model(layers=2)
  tokens, mask = jnp.asarray(TOKENS), jnp.asarray(SEG_MASK * np.array([[1], [1], [0]]) + PAD_MASK * np.array([[0], [0], [1]]))
  forward = lambda m: m(tokens, attention_mask_bt=mask, dropout_key=jax.random.key(4))  # noqa: E731
  ours, theirs = (_run_as(model, forward, attention_impl=a) for a in ("custom", impl))
  real = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(theirs)[real], np.asarray(ours)[real], atol=1e-5, rtol=0)
  (l1, g1), (l0, g0) = (_lora_grads(model, tokens, mask, attention_impl=a) for a in (impl, "custom"))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    _assert_close_at_scale(a, b)
  with pytest.raises(ModelError, match="attention_impl='flash' is not one of"):
    _run_as(model, forward, attention_impl="flash")


def test_hf_layer_i_is_slice_i_of_the_stacked_weights(tiny):
  hf, model, _ = tiny
  sd = hf.state_dict()
  for path, lin in model.projections():
    for i in range(model.config.num_hidden_layers):
      np.testing.assert_array_equal(np.asarray(lin.kernel[...][i]), sd[f"model.{path.format(i=i)}.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(model.layers.post_attention_layernorm.weight[...][1]),
                                sd["model.layers.1.post_attention_layernorm.weight"].numpy())
