"""Fused soft tokens (exact placement, text-only equivalence) and the joint losses (gradients, switches)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections import ConfigDict

import train_helpers
from clclm_jax.contrastive import fusion, losses
from clclm_jax.data import augment, fused
from clclm_jax.contrastive.fusion import FusedRec, FusionConfig, place_soft_tokens
from clclm_jax.data.records import Catalogue, Interaction, Item
from clclm_jax.model.llama import QInt8
from clclm_jax.train import evaluate, sharding, step as step_lib, trainer
from clclm_jax.train.errors import ConfigError

PH, PH_ID, K = "<ph>", 5, 3


class CharTokenizer:
  """One id per character (7..246) and one for the placeholder text; BOS 1, EOS 2."""

  eos_token_id = 2

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = [1] if add_special_tokens else []
    for i, part in enumerate(text.split(PH)):
      ids += [PH_ID] * (i > 0) + [7 + ord(c) % 240 for c in part]
    return ids


def _data(n: int = 4):
  rng = np.random.default_rng(0)
  catalogue = Catalogue(Item(i, f"M{i}") for i in range(1, 21))
  xs = [Interaction(u, tuple(int(i) for i in rng.choice(np.arange(1, 21), 5, replace=False)),
                    tuple(bool(b) for b in rng.integers(0, 2, 5)), int(rng.integers(1, 21)), u % 2)
        for u in range(1, n + 1)]
  return xs, catalogue


def _spec(k: int = K) -> fused.PromptSpec:
  return fused.PromptSpec("movie", PH, PH_ID, num_soft_tokens=k, cutoff_len=1024, history_len=6, view_len=64)


def _model(dropout: float = 0.0, encoder_dropout: float = 0.0, prompt_dropout: bool = True, **fusion) -> FusedRec:
  """max_len 7: a history of 6 and, for target-aware encoders, the target."""
  cfg = FusionConfig(num_items=20, placeholder_id=PH_ID, num_soft_tokens=K, encoder_hidden=16,
                     projector_hidden=32, encoder_dropout=encoder_dropout, max_len=7, prompt_dropout=prompt_dropout,
                     **fusion)
  return FusedRec(train_helpers.tiny_model(dropout=dropout), cfg, rngs=nnx.Rngs(3))


def _batch(k: int = K, views: bool = True):
  xs, cat = _data()
  tok = CharTokenizer()
  batch = next(fused.train_batches(xs, cat, tok, _spec(k), batch_size=4, seed=0, views=views))
  return {key: jnp.asarray(v) for key, v in batch.items()}


def test_fused_prompt_places_exactly_k_soft_tokens():
  b = _batch()
  slots_bt = b["tokens"] == PH_ID
  np.testing.assert_array_equal(slots_bt.sum(1), K)
  assert not (b["loss_mask"] * slots_bt).any()
  first_slot = jnp.argmax(slots_bt, axis=1)
  last_history = b["history_mask"].shape[1] - 1 - jnp.argmax(b["history_mask"][:, ::-1], axis=1)
  assert (b["history_mask"].sum(1) > 0).all() and (last_history < first_slot).all()
  model = _model()
  x_btd = model.inputs_embeds(b["tokens"], b["history_ids"], b["history_feedback"])
  changed_bt = jnp.any(x_btd != model.llm.embed(b["tokens"]), axis=-1)
  np.testing.assert_array_equal(changed_bt, slots_bt)
  soft_bkd = model.soft_tokens(b["history_ids"], b["history_feedback"])
  np.testing.assert_array_equal(x_btd[slots_bt].reshape(4, K, -1), soft_bkd)


def test_text_only_path_is_the_llm():
  model = _model()
  b = _batch()
  args = (b["tokens"], b["positions"], b["attention_mask"])
  np.testing.assert_array_equal(model(*args), model.llm(*args))  # fusion disabled: no history passed
  text = _batch(k=0)  # text-only prompts with a history: no slots, nothing replaced
  text_args = (text["tokens"], text["positions"], text["attention_mask"])
  np.testing.assert_array_equal(
      model(*text_args, history_ids_bl=text["history_ids"], feedback_bl=text["history_feedback"]),
      model.llm(*text_args))
  fused = model(*args, history_ids_bl=b["history_ids"], feedback_bl=b["history_feedback"])
  zeroed = model.llm(None, b["positions"], b["attention_mask"], inputs_embeds_btd=_zeroed_embeds(model, b))
  before_bt = jnp.cumsum(b["tokens"] == PH_ID, axis=1) == 0
  np.testing.assert_allclose(np.asarray(fused)[before_bt], np.asarray(zeroed)[before_bt], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(fused)[before_bt], np.asarray(model.llm(*args))[before_bt],
                             rtol=1e-5, atol=1e-5)
  after_bt = ~before_bt & (b["attention_mask"] > 0)
  assert np.abs(np.asarray(fused)[after_bt] - np.asarray(zeroed)[after_bt]).max() > 1e-3


@pytest.mark.parametrize("prompt_dropout", [True, False])
def test_prompt_dropout_switches_encoder_dropout_under_the_soft_tokens(prompt_dropout):
  model, b = _model(encoder_dropout=0.5, prompt_dropout=prompt_dropout), _batch()
  args, hist = (b["tokens"], b["positions"], b["attention_mask"]), dict(history_ids_bl=b["history_ids"],
                                                                     feedback_bl=b["history_feedback"])
  h1, h2 = (model.hidden_states(*args, **hist, dropout_key=jax.random.key(i)) for i in (1, 2))
  assert (np.abs(np.asarray(h1 - h2)).max() > 1e-4) == prompt_dropout  # the tiny LLM itself has no dropout
  if not prompt_dropout:
    np.testing.assert_allclose(h1, model.hidden_states(*args, **hist), rtol=1e-5, atol=1e-5)


def _zeroed_embeds(model: FusedRec, b) -> jax.Array:
  """Input embeddings with zero vectors at the placeholders (projector output zeroed)."""
  zeros_bkd = jnp.zeros((b["tokens"].shape[0], K, model.llm.config.hidden_size))
  return place_soft_tokens(model.llm.embed(b["tokens"]), b["tokens"], zeros_bkd, PH_ID)


def _grads(model: FusedRec, b, names):
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)

  def total(p):
    m = nnx.merge(graphdef, p, frozen)
    return sum(step_lib.loss_terms(m, b, jax.random.key(0), names).values())

  norms = {"lora_b": 0.0, "projector": 0.0, "encoder": 0.0, "align": 0.0, "feedback": 0.0}
  for path, g in jax.tree_util.tree_leaves_with_path(jax.grad(total)(params)):
    names = "/".join(str(getattr(k, "key", k)) for k in path)
    part = next(p for p in ("lora_b", "lora_a", "projector", "encoder", "align", "feedback") if p in names)
    if part != "lora_a":
      norms[part] += float(jnp.sum(jnp.square(g)))
  return norms, frozen


@pytest.mark.parametrize("names,nonzero", [
    (("fused_lm",), {"lora_b", "projector", "encoder"}),
    (("seq_cl",), {"encoder"}),
    (("text_cl",), {"lora_b"}),
    (("align_cl",), {"lora_b", "encoder", "align"}),
])
def test_gradients_flow_only_where_intended(names, nonzero):
  model = _model()
  for _, lin in model.llm.projections():  # B = 0 at init would hide LoRA's gradient path
    if lin.lora_b is not None:
      lin.lora_b.set_value(jnp.full(lin.lora_b.shape, 0.01))
  norms, frozen = _grads(model, _batch(), names)
  assert {k for k, v in norms.items() if v > 0} == nonzero, norms
  assert all(np.isfinite(v) for v in norms.values())
  assert any(isinstance(v, QInt8) for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable)))


OPTIM = ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule="constant", max_grad_norm=1.0, b1=0.9, b2=0.999,
                        weight_decay=0.0))


def _fit(model, xs, cat, workdir, loss_weights, steps=2, views=True):
  """`steps` updates of every `nnx.Param` through the one trainer; returns the metrics rows."""
  stage = trainer.Stage("fused", workdir, lambda: fused.train_batches(xs, cat, CharTokenizer(), _spec(), batch_size=4,
                                                                     seed=0, views=views),
                        loss_weights, steps, OPTIM, 4, 4)
  mesh = sharding.make_mesh((-1, 1, 1))
  trainer.place(model, mesh)
  trainer.run_stage(stage, model, mesh)
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_losses_finite_and_switching_off_removes_term(tmp_path):
  xs, cat = _data(8)
  model = _model(dropout=0.05)
  before = np.asarray(model.projector.up_proj.kernel[...])
  logged = _fit(model, xs, cat, tmp_path, {"fused_lm": 1.0, "seq_cl": 0.1, "text_cl": 0.0, "align_cl": 0.1})
  terms = {k for k in logged[0] if k.startswith("train/loss/")}
  assert terms == {"train/loss/fused_lm", "train/loss/seq_cl", "train/loss/align_cl"} and len(logged) == 2
  for m in logged:
    assert all(np.isfinite(v) for v in m.values())
    np.testing.assert_allclose(m["train/loss"], m["train/loss/fused_lm"] + 0.1 * (
        m["train/loss/seq_cl"] + m["train/loss/align_cl"]), rtol=1e-5)
  assert not np.array_equal(np.asarray(model.projector.up_proj.kernel[...]), before)


def _hint_kd(model: FusedRec, b) -> jax.Array:
  return step_lib.loss_terms(model, b, None, ["hint_kd"])["hint_kd"]


def test_hint_kd_is_the_answer_cross_entropy_against_the_fixed_encoder_hint():
  yes_no = (7 + ord("Y"), 7 + ord("N"))
  model = _model(encoder_dropout=0.3, target_aware=True, answer_hint=yes_no, hint_scale=2.0)
  for _, lin in model.llm.projections():
    if lin.lora_b is not None:
      lin.lora_b.set_value(jnp.full(lin.lora_b.shape, 0.01))
  b = _batch(views=False)
  p_yes = np.asarray(evaluate.yes_probability(model, b, *yes_no))
  z, _ = model.encode_history(b["history_ids"], b["history_feedback"], b["target_ids"])
  hint = 1 / (1 + np.exp(-2.0 * np.asarray(model.like_logit(z), np.float64)))
  want = -np.mean(hint * np.log(p_yes) + (1 - hint) * np.log(1 - p_yes))
  np.testing.assert_allclose(_hint_kd(model, b), want, rtol=1e-5)
  norms, _ = _grads(model, b, ("hint_kd",))
  assert {k for k, v in norms.items() if v > 0} == {"lora_b", "projector", "encoder", "feedback"}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def fixed_target(p):  # the hint as a constant: the encoder gets gradient only through the prompt's soft tokens
    q = evaluate.yes_probability(nnx.merge(graphdef, p, rest), b, *yes_no)
    return -jnp.mean(hint * jnp.log(q) + (1 - hint) * jnp.log(1 - q))

  got = jax.grad(lambda p: _hint_kd(nnx.merge(graphdef, p, rest), b))(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(jax.grad(fixed_target)(params))):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="answer_hint"):
    _hint_kd(_model(), b)


def test_fused_lm_and_hint_kd_share_one_forward(monkeypatch):
  model = _model(dropout=0.1, encoder_dropout=0.3, answer_hint=(7 + ord("Y"), 7 + ord("N")), target_aware=True)
  b, key = _batch(views=False), jax.random.key(3)
  alone = {n: step_lib.loss_terms(model, b, key, [n])[n] for n in ("fused_lm", "hint_kd")}
  calls = []
  forward = losses.fused_hidden
  monkeypatch.setattr(losses, "fused_hidden", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
  both = step_lib.loss_terms(model, b, key, ["hint_kd", "fused_lm", "seq_cl"])
  assert len(calls) == 1 and set(both) == {"fused_lm", "hint_kd", "seq_cl"}
  for n, v in alone.items():  # same dropout draw: the pair takes the key of its first name, as each alone
    np.testing.assert_allclose(both[n], v, rtol=1e-6)


def test_target_ce_equals_the_full_logits_ce():
  model = _model()
  for _, lin in model.llm.projections():
    if lin.lora_b is not None:
      lin.lora_b.set_value(jnp.full(lin.lora_b.shape, 0.01))
  text, fused = _batch(k=0, views=False), _batch(views=False)
  assert text["target_index"].shape[1] % 8 == 0
  np.testing.assert_array_equal((text["target_index"] > 0).sum(1), text["loss_mask"][:, 1:].sum(1))
  key = jax.random.key(0)
  np.testing.assert_allclose(step_lib.LOSSES["text_lm"](model, text, key), step_lib.LOSSES["lm"](model.llm, text, key),
                             rtol=1e-5)
  np.testing.assert_allclose(step_lib.LOSSES["lm"](model, text, key), step_lib.LOSSES["lm"](model.llm, text, key),
                             rtol=1e-6)  # `lm` runs on the fused model too (its text path)
  logits_btv = model(fused["tokens"], fused["positions"], fused["attention_mask"],
                     history_ids_bl=fused["history_ids"], feedback_bl=fused["history_feedback"])
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv[:, :-1], fused["tokens"][:, 1:])
  w_bt = fused["loss_mask"][:, 1:]
  got = step_lib.loss_terms(model, fused, key, ["fused_lm"])["fused_lm"]
  np.testing.assert_allclose(got, (ce_bt * w_bt).sum() / w_bt.sum(), rtol=1e-5)


def test_one_scorer_for_fused_and_text_prompts_compiles_once_per_shape(tmp_path):
  xs, cat = _data(8)
  model, tok = _model(), CharTokenizer()
  mesh = sharding.make_mesh((-1, 1, 1))
  trainer.place(model, mesh)
  scorer = evaluate.make_scorer(model, mesh, 7, 8, stop_token=PH_ID)
  evals = fused.eval_batches(xs, cat, tok, _spec(), batch_size=4)
  first = scorer(model, evals)
  compiled = scorer.step.batch._cache_size()  # pylint: disable=protected-access
  again = scorer(model, evals)
  assert scorer.step.batch._cache_size() == compiled  # pylint: disable=protected-access
  np.testing.assert_array_equal(first.p_yes, again.p_yes)
  np.testing.assert_array_equal(first.label, [x.label for x in xs])
  direct = [float(p) for b in evals for p, i in zip(evaluate.yes_probability(model, b, 7, 8), b["index"]) if i >= 0]
  np.testing.assert_allclose(first.p_yes, np.asarray(direct)[np.argsort([i for b in evals for i in b["index"]
                                                                         if i >= 0])], atol=1e-5)
  one_width = fused.eval_batches(xs, cat, tok, _spec(), batch_size=4, max_widths=1)
  assert len({b["tokens"].shape[1] for b in one_width}) == 1
  np.testing.assert_allclose(scorer(model, one_width).p_yes, first.p_yes, atol=1e-5)  # padding changes nothing
  assert evaluate.shared_prefix(list(evals)).size > 100  # the instruction runs once, cached
  text = scorer(model, fused.eval_batches(xs, cat, tok, _spec(0), batch_size=4))  # text-only prompts: the LLM
  llm_scorer = evaluate.make_scorer(model.llm, mesh, 7, 8)
  plain = [{k: v for k, v in b.items() if k != "history_feedback"}  # TALLRec batches: no fused inputs
           for b in fused.eval_batches(xs, cat, tok, _spec(0), batch_size=4)]
  np.testing.assert_allclose(text.p_yes, llm_scorer(model.llm, plain).p_yes, atol=1e-5)
  model.config = dataclasses.replace(model.config, pooling="last")  # an ablation: another graph, scored as such
  sharp = [float(p) for b in evals for p, i in zip(evaluate.yes_probability(model, b, 7, 8), b["index"]) if i >= 0]
  order = np.argsort([i for b in evals for i in b["index"] if i >= 0])
  np.testing.assert_allclose(scorer(model, evals).p_yes, np.asarray(sharp)[order], atol=1e-5)
  assert np.abs(np.asarray(sharp)[order] - first.p_yes).max() > 1e-4
  with pytest.raises(ConfigError, match="unknown losses"):
    _fit(model, xs, cat, tmp_path, {"nope": 1.0})


def test_packed_augmentation_keeps_likes_with_items():
  ids = jnp.array([[0, 0, 3, 4, 5, 6], [0, 7, 8, 9, 10, 11]])
  fb = jnp.array([[0, 0, 1, 2, 1, 2], [0, 2, 2, 1, 1, 2]])
  right, n = losses.left_to_right(ids * 4 + fb)
  np.testing.assert_array_equal(n, [4, 5])
  np.testing.assert_array_equal(right[0], [13, 18, 21, 26, 0, 0])
  v1, _, v2, _ = augment.two_views_batch(jax.random.key(0), right, n, _model().packed_corr(), mask_id=21 * 4)
  for view in (v1, v2):
    for row, orig in zip(np.asarray(view), np.asarray(ids * 4 + fb)):
      assert set(row[row > 0].tolist()) <= set(orig[orig > 0].tolist()) | {21 * 4}


def _char_tokenizer(text, add_special_tokens):
  return {"input_ids": CharTokenizer().encode(text, add_special_tokens)}


def test_text_embeddings_do_not_depend_on_their_batch():
  llm = train_helpers.tiny_model(dropout=0.0)
  texts = ['"Dune" written by Frank Herbert', '"It"', '"The Left Hand of Darkness" written by Ursula K. Le Guin']
  together = fusion.text_embeddings(llm, _char_tokenizer, texts, batch_size=4)
  alone = np.concatenate([fusion.text_embeddings(llm, _char_tokenizer, [t], batch_size=1) for t in texts])
  np.testing.assert_allclose(together, alone, atol=1e-5)  # padding never reaches a text's states
  np.testing.assert_allclose(np.linalg.norm(together, axis=-1), 1.0, atol=1e-5)
  assert abs(float(together[0] @ together[2])) < 0.999  # different texts, different vectors


def test_item_text_table_is_a_frozen_encoder_table():
  llm = train_helpers.tiny_model(dropout=0.0)
  catalogue = Catalogue([Item(1, "Dune", "Frank Herbert"), Item(3, "It", "Stephen King")])  # id 2 unused
  table = fusion.item_text_table(llm, _char_tokenizer, catalogue, "book")
  assert table.shape == (5, llm.config.hidden_size)  # pad, ids 1..3, mask
  assert not table[[0, 2, 4]].any()
  np.testing.assert_allclose(table[3], fusion.text_embeddings(llm, _char_tokenizer, ['"It" written by Stephen King'])[0],
                             atol=1e-5)
  cfg = FusionConfig(num_items=3, placeholder_id=PH_ID, num_soft_tokens=K, encoder_hidden=16, projector_hidden=16)
  model = FusedRec(llm, cfg, item_init=table, rngs=nnx.Rngs(0))
  trainable = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "encoder/item_proj/kernel" in trainable and not any("embed_items" in p for p in trainable)
  np.testing.assert_array_equal(model.encoder.embed_items[...], table)
