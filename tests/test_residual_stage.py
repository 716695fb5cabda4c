"""A residual fused stage can only keep or climb: validated before its first step, its starting parameters (the
encoder, LoRA at zero) are the best checkpoint until a validated step beats them; killed and rerun, it ends bitwise
as an uninterrupted run (train/trainer.py `Stage.validate_at_start`, contrastive/recipe.py)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

import test_fusion as tf
import test_residual as tr
import train_helpers
from clclm_jax.contrastive import feedback, fusion
from clclm_jax.data import fused
from clclm_jax.train import evaluate, runconfig, sharding, trainer
from clclm_jax.train.errors import ConfigError


class Killed(BaseException):
  """The process dies here: nothing after this point runs."""


def _die():
  raise Killed


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _flipped_stage(workdir, model, xs, cat, scorer, base, dies_at: int = 0) -> trainer.Stage:
  """Trains the LoRA of `model` on `xs` with every label flipped, validated on `xs` as they are (text-only prompts
  with their cached base logits): no step can beat the encoder, whose validation AUC is 1 (`_encoder_labels`)."""
  wrong = [dataclasses.replace(x, label=1 - x.label) for x in xs]
  spec = tf._spec(0)  # pylint: disable=protected-access

  def batches():
    it = fused.train_batches(wrong, cat, tf.CharTokenizer(), spec, batch_size=4, seed=0, base_logits=base)
    return train_helpers.DiesAt(it, dies_at, _die) if dies_at else it

  check = lambda m: scorer(m, fused.eval_batches(xs, cat, tf.CharTokenizer(), spec, batch_size=4,  # noqa: E731
                                                 base_logits=base)).metrics()
  optim = tf.OPTIM.copy_and_resolve_references()
  optim.lr = 0.5  # Adam's first steps move each weight by about this: the encoder's gate reaches 0 by step 2
  return trainer.Stage("fused", workdir, batches, {"residual_answer": 1.0}, 6, optim, 4, 4,
                       trains=fusion.residual_trains(False), validate=check, eval_every=1, patience=3,
                       validate_at_start=True, seed=0)


def test_a_residual_stage_that_lowers_validation_ends_as_its_encoder_and_resumes_bitwise(tmp_path):
  xs, cat = tf._data(8)  # pylint: disable=protected-access
  model = tr._model(gate=True)  # pylint: disable=protected-access
  mesh = sharding.make_mesh((-1, 1, 1))
  encoder = feedback.like_probabilities(model, xs)
  # Labels the random encoder ranks perfectly: its validation AUC is 1, so only a worse model can follow.
  xs = [dataclasses.replace(x, label=int(p > np.median(encoder))) for x, p in zip(xs, encoder)]
  scorer, base = tr._base_logits(model, xs, cat)  # pylint: disable=protected-access
  start = jax.tree.map(np.array, nnx.state(model, nnx.Param))

  summary = trainer.run_stage(_flipped_stage(tmp_path / "whole", model, xs, cat, scorer, base), model, mesh)
  aucs = {r["step"]: r["valid/auc"] for r in _rows(tmp_path / "whole") if "valid/auc" in r}
  assert sorted(aucs) == [0, 1, 2, 3] and aucs[0] == 1.0  # 3 validations without a better AUC stop it
  assert min(aucs[s] for s in (1, 2, 3)) < 1.0, aucs  # training made validation worse
  assert (summary["best_step"], summary["stopped"], summary["valid_auc"]) == (0, "early stopping", 1.0)
  for (_, a), (_, b) in zip(nnx.to_flat_state(start), nnx.to_flat_state(nnx.state(model, nnx.Param)), strict=True):
    np.testing.assert_array_equal(a.get_value(), np.asarray(b.get_value()))  # exactly the starting parameters
  final = scorer(model, fused.eval_batches(xs, cat, tf.CharTokenizer(), tf._spec(0), batch_size=4,  # pylint: disable=protected-access
                                           base_logits=base)).p_yes
  np.testing.assert_allclose(final, encoder, rtol=1e-6, atol=1e-7)
  assert evaluate.auc(final, [x.label for x in xs]) == aucs[0]

  # Killed before step 1 (after the step-0 validation, before any latest checkpoint), then inside the stage (after
  # step 2's), then rerun to the end: the same rows, best step and parameters as the uninterrupted run.
  run = tmp_path / "run"
  for dies_at in (1, 3):
    nnx.update(model, start)
    with pytest.raises(Killed):
      trainer.run_stage(_flipped_stage(run, model, xs, cat, scorer, base, dies_at), model, mesh)
  assert [r["step"] for r in _rows(run)] == [0, 1, 2]
  nnx.update(model, start)
  resumed = trainer.run_stage(_flipped_stage(run, model, xs, cat, scorer, base), model, mesh)
  timing = ("wall_s", "tokens_per_s")  # the only parts of the summary that depend on the interruptions
  assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in summary.items() if k not in timing}
  assert (run / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
  (a, step_a), (b, step_b) = train_helpers.best_params(tmp_path / "whole"), train_helpers.best_params(run)
  assert step_a == step_b == 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _tiny_residual():
  """configs/tiny_fused.py switched as configs/movie.py switches configs/movie_soft_tokens.py (`residual_overrides`),
  without encoder pretraining (the stage list is the residual stage alone), validated at steps 0..3."""
  from configs import movie, tiny_fused  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  c = movie.residual_overrides(tiny_fused.get_config())
  c.data.test_size, c.fusion.pretrain.epochs = 0, 0
  c.stage2.steps, c.train.eval_every, c.train.patience = 3, 1, 0
  c.fusion.residual_confirm_size = 0  # the best validated step stands (the confirmation has its own tests below)
  return c


def test_residual_recipe_validates_step_0_and_resumes_bitwise(tmp_path, data_root, monkeypatch):
  from clclm_jax.contrastive import recipe  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  c = _tiny_residual()
  whole = recipe.train(c, tmp_path / "whole", log=lambda _: None)
  aucs = {r["step"]: r["valid/auc"] for r in _rows(tmp_path / "whole") if "valid/auc" in r}
  assert sorted(aucs) == [0, 1, 2, 3] and whole["valid_auc"] == max(aucs.values())
  assert whole["best_step"] == min(s for s, a in aucs.items() if a == whole["valid_auc"])
  run_stage = trainer.run_stage

  def dying(stage, model, mesh):
    stage = dataclasses.replace(stage, batches=lambda b=stage.batches: train_helpers.DiesAt(b(), 3, _die))
    return run_stage(stage, model, mesh)
  monkeypatch.setattr(trainer, "run_stage", dying)
  with pytest.raises(Killed):
    recipe.train(c, tmp_path / "run", log=lambda _: None)
  monkeypatch.setattr(trainer, "run_stage", run_stage)
  resumed = recipe.train(c, tmp_path / "run", log=lambda _: None)  # a new process: base logits computed again
  assert {k: resumed[k] for k in ("valid_auc", "steps", "best_step")} == {
      k: whole[k] for k in ("valid_auc", "steps", "best_step")}
  assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "run" / "metrics.jsonl").read_text()
  (a, step_a), (b, step_b) = train_helpers.best_params(tmp_path / "whole"), train_helpers.best_params(tmp_path / "run")
  assert step_a == step_b == whole["best_step"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _rising_stage(workdir, model, xs, cat, scorer, base, keep: bool, confirms: list) -> trainer.Stage:
  """`_flipped_stage` validated by a metric that rises with every validation (steps 0..6: 0.1 .. 0.7), so step 6 is
  the best validated step, then confirmed by a check that says `keep` (and records each call in `confirms`)."""
  seen = []

  def validate(_):
    seen.append(None)
    return {"auc": 0.1 * len(seen)}

  def confirm(m):
    confirms.append(m)
    return {"keep": keep, "n": len(xs)}
  stage = _flipped_stage(workdir, model, xs, cat, scorer, base)
  return dataclasses.replace(stage, validate=validate, confirm=confirm, patience=0)


def test_a_best_step_that_fails_its_confirmation_leaves_the_start_and_a_rerun_checks_nothing(tmp_path):
  xs, cat = tf._data(8)  # pylint: disable=protected-access
  model = tr._model(gate=True)  # pylint: disable=protected-access
  mesh = sharding.make_mesh((-1, 1, 1))
  scorer, base = tr._base_logits(model, xs, cat)  # pylint: disable=protected-access
  start = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  params = lambda: nnx.to_flat_state(nnx.state(model, nnx.Param))  # noqa: E731

  confirms = []
  kept = trainer.run_stage(_rising_stage(tmp_path / "kept", model, xs, cat, scorer, base, True, confirms), model, mesh)
  assert (kept["best_step"], kept["valid_auc"], kept["confirm"]) == (6, pytest.approx(0.7),
                                                                      {"keep": True, "n": 8, "best_step": 6})
  assert len(confirms) == 1 and train_helpers.best_params(tmp_path / "kept")[1] == 6
  assert any(not np.array_equal(a.get_value(), np.asarray(b.get_value()))
             for (_, a), (_, b) in zip(nnx.to_flat_state(start), params()))  # the trained step is the result

  nnx.update(model, start)
  confirms.clear()
  stage = _rising_stage(tmp_path / "not_kept", model, xs, cat, scorer, base, False, confirms)
  summary = trainer.run_stage(stage, model, mesh)
  assert (summary["best_step"], summary["valid_auc"], summary["confirm"]) == (0, pytest.approx(0.1),
                                                                             {"keep": False, "n": 8, "best_step": 6})
  assert len(confirms) == 1 and train_helpers.best_params(tmp_path / "not_kept")[1] == 0
  for (_, a), (_, b) in zip(nnx.to_flat_state(start), params(), strict=True):
    np.testing.assert_array_equal(a.get_value(), np.asarray(b.get_value()))  # exactly the starting parameters
  # Rerun on the finished folder (as after a kill between the check and the stage's end): the saved result, no check.
  nnx.update(model, start)
  again = trainer.run_stage(stage, model, mesh)
  timing = ("wall_s", "tokens_per_s")
  assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in summary.items() if k not in timing}
  assert len(confirms) == 1


def test_the_recipe_confirmation_pairs_the_best_step_with_the_encoder_on_the_validation_split(data_root):
  from clclm_jax.contrastive import recipe  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from clclm_jax.data import configured, fewshot  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  c = _tiny_residual()
  c.fusion.residual_confirm_size = 48
  r = recipe.build(c)
  check = recipe.residual_confirm(r)
  xs = [r.splits.valid[i] for i in fewshot.fewshot_positions(len(r.splits.valid), 48, c.data.fewshot_seed)]
  # LoRA at zero: the model is its encoder, so the difference is exactly zero and the step is not kept.
  result = check(r.model)
  assert result["n"] == 48 and not result["keep"]
  assert result["auc"] == result["encoder_auc"] == feedback.encoder_auc(r.model, xs)
  assert result["difference"] == 0.0 and result["ci95"] == [0.0, 0.0]
  # At its encoder the recipe scores a split by the encoder alone: the same AUC as the LLM passes give.
  scored = [r.splits.valid[i] for i in configured.eval_positions(c, r.splits, "valid")]
  llm = r.scorer(r.model, r.eval_batches(scored, r.answer_spec), desc="the LLM passes")
  r.scorer = None  # not called: no LLM pass
  assert recipe.score_split(r, "valid")["auc"] == evaluate.auc(llm.p_yes, llm.label)
  c.fusion.residual_confirm_size = len(r.splits.valid) + 1
  with pytest.raises(ConfigError, match="residual_confirm_size"):
    recipe.residual_confirm(dataclasses.replace(r, config=c))
  c.fusion.residual_confirm_size, c.fusion.mode = -1, "soft_tokens"
  with pytest.raises(ConfigError, match="residual_confirm_size"):
    runconfig.validate(c)
