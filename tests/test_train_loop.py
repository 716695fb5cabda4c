"""Trainer guards: a non-finite loss stops with the step and loss term; nothing non-finite is saved."""

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
