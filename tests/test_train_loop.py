"""Trainer guards: a non-finite loss stops with the step and loss term; nothing non-finite is saved."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from clclm_jax.train import checkpoint, loop
from configs import tiny


def test_non_finite_loss_names_step_and_term():
  with pytest.raises(FloatingPointError, match=r"step 7: .*loss/contrastive"):
    loop._check_finite({"loss": np.nan, "loss/lm": 2.0, "loss/contrastive": np.inf, "grad_norm": np.nan}, 7)
  loop._check_finite({"loss": 1.0, "loss/lm": 1.0}, 1)


def test_non_finite_params_are_never_saved(tmp_path):
  ckpts = checkpoint.Checkpoints(tmp_path)
  with pytest.raises(FloatingPointError, match="not saving"):
    ckpts.save_best(3, {"lora_a": jnp.array([1.0, jnp.nan])}, {"step": 3})
  assert ckpts.best_step() is None
  ckpts.close()


def test_configs_are_locked_and_tiny_is_small():
  c = tiny.get_config()
  with pytest.raises(AttributeError):
    c.train.nope = 1
  assert c.model.preset == "tiny" and c.data.test_size > 0



def _losses(workdir):
  return [json.loads(l)["train/loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _tiny(stages=("rec",), init_from=""):
  """configs/tiny.py cut to 2 steps per stage and no test split."""
  c = tiny.get_config()
  c.stages, c.lora.init_from = stages, init_from
  c.data.test_size, c.train.max_steps, c.train.eval_every = 0, 2, 2
  return c


def test_rec_stage_starts_from_stage_one_or_an_imported_peft_adapter(tmp_path, data_root):
  loop.train(_tiny(stages=("instruct", "rec")), tmp_path / "two")
  assert len(_losses(tmp_path / "two" / "instruct")) == 2 and len(_losses(tmp_path / "two")) == 2
  adapter = loop.export_best_peft(_tiny(), tmp_path / "two" / "instruct", tmp_path / "adapter")
  assert (adapter / "adapter_config.json").is_file()
  loop.train(_tiny(init_from=str(adapter)), tmp_path / "peft")
  loop.train(_tiny(), tmp_path / "scratch")
  two, imported, scratch = (_losses(tmp_path / d) for d in ("two", "peft", "scratch"))
  np.testing.assert_allclose(imported, two, rtol=1e-6)  # the same LoRA start, data and keys
  assert abs(scratch[0] - two[0]) > 1e-4


def test_summary_puts_the_like_ratio_reference_beside_each_auc():
  text = loop.format_summary({"best_step": 5, "valid_auc": 0.515, "valid_like_ratio_auc": 0.7021,
                              "test_auc": 0.5225, "test_like_ratio_auc": 0.6962, "wall_s": 12.0})
  valid, test = (next(l for l in text.splitlines() if l.startswith(k)) for k in ("valid AUC", "test AUC"))
  assert "0.5150" in valid and valid.endswith("history like-ratio on the same prompts: 0.7021")
  assert "0.5225" in test and test.endswith("history like-ratio on the same prompts: 0.6962")
  assert "like-ratio" not in loop.format_summary({"valid_auc": 0.6, "test_auc": None, "test_like_ratio_auc": 0.7})


def test_like_ratio_references_score_the_same_prompts_as_evaluation(data_root):
  c = tiny.get_config()
  sp = loop.rec_splits(c)
  refs = loop.like_ratio_references(c)
  assert set(refs) == {"valid_like_ratio_auc", "test_like_ratio_auc"}
  test = loop.eval_interactions(c, sp, "test")
  assert len(test) == c.data.test_size
  labels = np.array([x.label for x in test])
  share = np.array([np.mean(x.history_likes) if x.history_likes else 0.5 for x in test])
  pos, neg = share[labels == 1], share[labels == 0]
  pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
  assert refs["test_like_ratio_auc"] == pytest.approx(pairs)
