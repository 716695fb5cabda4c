"""Residual fusion (contrastive/fusion.py, mode='residual'): the answer logit is the encoder's like-logit plus what
LoRA changes in the LLM's Yes-minus-No logit, so with LoRA at zero the fused model scores as its encoder."""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import test_fusion as tf
from clclm_jax.contrastive import feedback, fusion, losses  # noqa: F401 (losses: registers residual_answer)
from clclm_jax.data import fused
from clclm_jax.train import evaluate, runconfig, sharding, step as step_lib, trainer
from clclm_jax.train.errors import ConfigError
from configs import book, book_soft_tokens, movie, movie_soft_tokens

YES_NO = (7 + ord("Y"), 7 + ord("N"))  # the test tokenizer's ids of "Y" and "N"


def _model(gate: bool = False, **kw) -> fusion.FusedRec:
  return tf._model(target_aware=True, mode="residual", residual_gate=gate, yes_no=YES_NO, **kw)  # pylint: disable=protected-access


def _set_lora_b(model, value: float) -> None:
  for _, lin in model.llm.projections():
    if lin.lora_b is not None:
      lin.lora_b.set_value(jnp.full(lin.lora_b.shape, value))


def _score(model, k: int, n: int = 8) -> evaluate.Scores:
  """The one scorer (shared prefix on) over `n` prompts with `k` soft tokens."""
  xs, cat = tf._data(n)  # pylint: disable=protected-access
  mesh = sharding.make_mesh((-1, 1, 1))
  trainer.place(model, mesh)
  scorer = evaluate.make_scorer(model, mesh, *YES_NO, stop_token=tf.PH_ID)
  batches = fused.eval_batches(xs, cat, tf.CharTokenizer(), tf._spec(k), batch_size=4)  # pylint: disable=protected-access
  assert evaluate.shared_prefix(list(batches)).size >= 16  # the cached-prefix path is what runs
  return scorer(model, batches)


@pytest.mark.parametrize("k,gate", [(0, True), (tf.K, False)])
def test_at_step_0_the_residual_model_scores_as_its_encoder(k, gate):
  model = _model(gate)
  xs, _ = tf._data(8)  # pylint: disable=protected-access
  scores = _score(model, k)
  encoder = feedback.like_probabilities(model, xs)
  np.testing.assert_allclose(scores.p_yes, encoder, rtol=1e-6, atol=1e-7)
  assert evaluate.auc(scores.p_yes, scores.label) == evaluate.auc(encoder, scores.label)
  assert fusion.at_its_encoder(model)  # so scoring may skip the LLM (recipe.score_split)
  _set_lora_b(model, 0.01)  # once LoRA moves, the LLM part does too
  assert np.abs(_score(model, k).p_yes - encoder).max() > 1e-4
  assert not fusion.at_its_encoder(model)
  if gate:  # LoRA at zero again, a gate moved: the encoder's logit is scaled, so the scores are no longer its own
    _set_lora_b(model, 0.0)
    model.residual_gates.set_value(jnp.asarray([0.5, 1.0]))
    assert not fusion.at_its_encoder(model)
  assert not fusion.at_its_encoder(tf._model(target_aware=True))  # pylint: disable=protected-access


def _reference_logits(model, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(encoder logit, LLM Yes-minus-No with LoRA, the same with LoRA zeroed) in float64 from full-vocabulary logits."""
  z, _ = model.encode_history(b["history_ids"], b["history_feedback"], b["target_ids"])
  enc = np.asarray(model.like_logit(z), np.float64)
  kw = dict(history_ids_bl=b["history_ids"], feedback_bl=b["history_feedback"], target_ids_b=b["target_ids"])

  def yes_minus_no(m):
    logits = np.asarray(m(b["tokens"], b["positions"], b["attention_mask"], **kw), np.float64)
    at = logits[np.arange(len(logits)), np.asarray(b["answer_index"])]
    return at[:, YES_NO[0]] - at[:, YES_NO[1]]

  lora = yes_minus_no(model)
  saved = {id(lin): lin.lora_b[...] for _, lin in model.llm.projections() if lin.lora_b is not None}
  _set_lora_b(model, 0.0)
  base = yes_minus_no(model)
  for _, lin in model.llm.projections():
    if lin.lora_b is not None:
      lin.lora_b.set_value(saved[id(lin)])
  return enc, lora, base


@pytest.mark.parametrize("k", [tf.K])  # the text-only prompt runs the same code with no slot to fill
def test_residual_loss_matches_a_numpy_reference(k):
  model = _model(gate=True)
  _set_lora_b(model, 0.01)
  model.residual_gates.set_value(jnp.array([0.7, 1.9]))
  b = tf._batch(k, views=False)  # pylint: disable=protected-access
  enc, lora, base = _reference_logits(model, b)
  logit = 0.7 * enc + 1.9 * (lora - base)
  y = np.asarray(b["label"], np.float64)
  want = np.mean(np.logaddexp(0, logit) - y * logit)  # BCE with logits
  got = step_lib.loss_terms(model, b, None, ["residual_answer"])["residual_answer"]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  p = evaluate.yes_probability(model, b, *YES_NO)  # the scorer's logit is the trained one
  np.testing.assert_allclose(p, 1 / (1 + np.exp(-logit)), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="mode='residual'"):
    step_lib.loss_terms(tf._model(target_aware=True), b, None, ["residual_answer"])  # pylint: disable=protected-access


def _parts(params) -> set[str]:
  return {str(path[0]) if path[0] != "llm" else "lora" for path, _ in nnx.to_flat_state(params)}


@pytest.mark.parametrize("k,gate,align,want", [(0, False, False, {"lora"}),
                                                (tf.K, True, False, {"lora", "residual_gates", "projector"}),
                                                (0, False, True, {"lora", "align_proj"})])
def test_the_residual_stage_trains_only_lora_gates_and_the_projector_with_soft_tokens(tmp_path, k, gate, align, want):
  """... and the alignment head when the stage trains `align_cl` (otherwise a fixed random map)."""
  model = _model(gate)
  _set_lora_b(model, 0.01)
  weights = {"residual_answer": 1.0} | ({"align_cl": 0.5} if align else {})
  trains = fusion.residual_trains(k > 0, weights)
  _, params, _ = nnx.split(model, trains, ...)
  assert _parts(params) == want
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  xs, cat = tf._data(8)  # pylint: disable=protected-access
  stage = trainer.Stage("fused", tmp_path, lambda: fused.train_batches(xs, cat, tf.CharTokenizer(), tf._spec(k),  # pylint: disable=protected-access
                                                                       batch_size=4, seed=0),
                        weights, 2, tf.OPTIM, 4, 4, trains=trains)
  trainer.place(model, sharding.make_mesh((-1, 1, 1)))
  trainer.run_stage(stage, model, sharding.make_mesh((-1, 1, 1)))
  after = nnx.state(model, nnx.Param)
  moved = set()
  for (path, old), (_, new) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
    if not np.array_equal(old.get_value(), np.asarray(new.get_value())):
      moved.add(str(path[0]) if path[0] != "llm" else "lora")
  assert moved == want  # the encoder, its feedback head and the unused heads stay as pretrained


def _base_logits(model, xs, cat, k: int = 0):
  """The scorer's cached base logits of `xs`' text-only prompts (what the recipe computes once per prompt set)."""
  mesh = sharding.make_mesh((-1, 1, 1))
  trainer.place(model, mesh)
  scorer = evaluate.make_scorer(model, mesh, *YES_NO, stop_token=tf.PH_ID)
  return scorer, scorer.base_logits(model, fused.eval_batches(xs, cat, tf.CharTokenizer(), tf._spec(k), batch_size=4))  # pylint: disable=protected-access


def test_cached_base_logits_give_the_recomputed_scores_and_loss():
  model = _model(gate=True)
  xs, cat = tf._data(8)  # pylint: disable=protected-access
  scorer, base = _base_logits(model, xs, cat)
  evals = lambda cached: fused.eval_batches(xs, cat, tf.CharTokenizer(), tf._spec(0), batch_size=4,  # noqa: E731  # pylint: disable=protected-access
                                            base_logits=base if cached else None)
  encoder = feedback.like_probabilities(model, xs)
  np.testing.assert_allclose(scorer(model, evals(True)).p_yes, encoder, rtol=1e-6, atol=1e-7)  # step 0: the encoder
  _set_lora_b(model, 0.01)
  model.residual_gates.set_value(jnp.array([0.7, 1.9]))
  np.testing.assert_array_equal(_base_logits(model, xs, cat)[1], base)  # LoRA off: fixed however LoRA moves
  cached, recomputed = scorer(model, evals(True)), scorer(model, evals(False))
  np.testing.assert_allclose(cached.p_yes, recomputed.p_yes, rtol=1e-5, atol=1e-6)
  assert np.abs(cached.p_yes - encoder).max() > 1e-4  # the LLM part is there, not cancelled by the cache
  b = next(fused.train_batches(xs, cat, tf.CharTokenizer(), tf._spec(0), batch_size=4, seed=0, base_logits=base))  # pylint: disable=protected-access
  b = {key: jnp.asarray(v) for key, v in b.items()}
  np.testing.assert_array_equal(b["base_logit"], base[np.asarray(b["index"])])  # each prompt's own
  loss = lambda batch: step_lib.loss_terms(model, batch, None, ["residual_answer"])["residual_answer"]  # noqa: E731
  np.testing.assert_allclose(loss(b), loss({k: v for k, v in b.items() if k != "base_logit"}), rtol=1e-5)
  with pytest.raises(ValueError, match="base logits with 3 soft tokens"):
    fused.eval_batches(xs, cat, tf.CharTokenizer(), tf._spec(tf.K), batch_size=4, base_logits=base)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="7 base logits for 8 prompts"):
    fused.eval_batches(xs, cat, tf.CharTokenizer(), tf._spec(0), batch_size=4, base_logits=base[:7])  # pylint: disable=protected-access


def test_residual_config_fields_are_checked():
  c = movie_soft_tokens.get_config()
  runconfig.validate(c)  # fusion.mode's default: soft tokens
  residual = movie.get_config
  for ready in (movie.get_config(), book.get_config()):
    runconfig.validate(ready)  # `python train.py --config=configs/<domain>.py` (residual fusion) passes its checks
  changed = _changed(movie_soft_tokens.get_config(), residual())
  assert changed == {"name", "fusion.mode", "fusion.residual_confirm_size", "stage1.steps", "stage1.loss_weights.text_lm", "stage1.history_targets",
                     "stage2.loss_weights.residual_answer", "stage2.loss_weights.fused_lm",
                     "stage2.loss_weights.seq_cl", "stage2.loss_weights.text_cl", "stage2.loss_weights.align_cl",
                     "train.eval_every", "train.patience"}
  assert _changed(book_soft_tokens.get_config(), book.get_config()) == changed - {"stage2.loss_weights.align_cl",
                                                                                "stage2.loss_weights.text_cl"} | {
                                                                                    "stage2.loss_weights.hint_kd"}
  c.fusion.mode = "sum"
  with pytest.raises(ConfigError, match="config.fusion.mode='sum': use 'soft_tokens'"):
    runconfig.validate(c)
  c = movie_soft_tokens.get_config()
  c.fusion.residual_gate = True
  with pytest.raises(ConfigError, match="config.fusion.mode='soft_tokens'.*mode=residual"):
    runconfig.validate(c)
  r = residual()
  r.stage1.steps = 8
  with pytest.raises(ConfigError, match="config.stage1.steps=8: residual fusion starts with LoRA at zero"):
    runconfig.validate(r)
  r = residual()
  r.stage2.loss_weights.residual_answer = 0.0
  with pytest.raises(ConfigError, match="config.stage2.loss_weights.residual_answer=0.0"):
    runconfig.validate(r)
  r = residual()
  r.stage2.loss_weights.fused_lm = 1.0
  with pytest.raises(ConfigError, match="config.stage2.loss_weights.fused_lm=1.0"):
    runconfig.validate(r)
  r = residual()
  r.stage2.loss_weights.seq_cl = 0.1
  with pytest.raises(ConfigError, match="config.stage2.loss_weights.seq_cl=0.1: residual fusion keeps the encoder"):
    runconfig.validate(r)
  r = residual()
  r.fusion.target_aware = False
  with pytest.raises(ConfigError, match="config.fusion.target_aware=False: residual fusion adds to the encoder"):
    runconfig.validate(r)
  with pytest.raises(ValueError, match="mode='residual' needs target_aware"):
    dataclasses.replace(_model().config, target_aware=False)


def _changed(a, b) -> set[str]:
  fa, fb = runconfig.flat(a), runconfig.flat(b)
  return {k for k in set(fa) | set(fb) if fa.get(k, "absent") != fb.get(k, "absent")}


def test_fused_quality_pairs_each_variant_with_the_encoder_alone():
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
  import fused_quality  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  assert fused_quality.stage2_weights("residual") == {"residual_answer": 1.0}
  assert fused_quality.FUSED["residual+gate"].fusion == {"mode": "residual", "residual_gate": True}
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  line = lambda p: ",".join(f"{x:.5f}" for x in p)  # noqa: E731  # as fused_quality stores P(Yes)
  enc = labels * 0.3 + rng.random(200)
  rows = [{"variant": "encoder_only", "shots": 0, "seed": None, "stage1_steps": 0, "stage2_steps": 0,
           "p_yes": line(enc)}]
  rows += [{"variant": "residual", "shots": 16, "seed": s, "stage1_steps": 0, "stage2_steps": 8,
            "p_yes": line(enc + labels * 0.5)} for s in (0, 1)]
  rows.append({"variant": "residual", "shots": 16, "seed": 2, "stage1_steps": 0, "stage2_steps": 4,
               "p_yes": line(enc)})  # exactly the encoder: a difference of 0
  pairs = fused_quality.paired_with_encoder(rows, list(labels), resamples=200)
  assert [(c["a"], c["b"], c["steps"], c["seeds"]) for c in pairs] == [
      ("residual", "encoder_only", "0+4", [2]), ("residual", "encoder_only", "0+8", [0, 1])]
  same, better = pairs
  assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["share_a_not_better"] == 1.0
  assert better["difference"] > 0 and better["ci95"][0] > 0
  np.testing.assert_allclose(better["auc_b"], evaluate.auc(np.round(enc, 5), labels))
