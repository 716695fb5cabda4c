"""Exact resume: SIGTERM saves and exits cleanly; kill -9 then restart ends bitwise equal to an uninterrupted run."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import jax
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).parents[1]
ARGS = ["--config=configs/tiny.py", "--config.data.test_size=0", "--config.train.checkpoint_every=1",
        "--config.train.eval_every=3"]


def _start(workdir):
  return subprocess.Popen([sys.executable, "train.py", *ARGS, f"--workdir={workdir}"], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out


def _interrupt_after(workdir, steps, sig):
  proc = _start(workdir)
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(sig)
  proc.communicate(timeout=600)
  return proc.returncode


def _final(workdir):
  latest = workdir / "checkpoints" / "latest"
  step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore(latest / str(step) / "state")
  return step, state, (workdir / "metrics.jsonl").read_text()


def test_sigterm_then_kill9_resume_is_bitwise_exact(tmp_path, data_root):
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  _finish(_start(ref_dir))
  assert _interrupt_after(run_dir, 2, signal.SIGTERM) == 0  # clean exit with a checkpoint
  assert any(p.name.isdigit() for p in (run_dir / "checkpoints" / "latest").iterdir())
  assert _interrupt_after(run_dir, 5, signal.SIGKILL) == -signal.SIGKILL
  _finish(_start(run_dir))
  ref_step, ref_state, ref_metrics = _final(ref_dir)
  step, state, metrics = _final(run_dir)
  assert step == ref_step == 8
  leaves, ref_leaves = jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])
  assert len(leaves) == len(ref_leaves) > 0
  for a, b in zip(leaves, ref_leaves):
    np.testing.assert_array_equal(a, b)
  assert metrics == ref_metrics
  assert [json.loads(l)["step"] for l in metrics.splitlines()] == list(range(1, 9))


def test_a_run_killed_between_the_best_and_the_latest_save_of_a_step_saves_that_step_again(tmp_path):
  """Issue 52 item 1: the best params of step 8 were on disk, the latest state of step 8 not yet; the rerun
  reaches step 8 again and saves its best over the old one instead of failing with StepAlreadyExistsError."""
  from clclm_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  ckpts = checkpoint.Checkpoints(tmp_path)
  ckpts.save_best(8, {"w": np.zeros(3, np.float32)}, {"step": 8})
  ckpts.close()  # killed here
  again = checkpoint.Checkpoints(tmp_path)
  again.save_best(8, {"w": np.ones(3, np.float32)}, {"step": 8, "rerun": True})
  params, meta = again.restore_best({"w": jax.numpy.zeros(3)})
  again.close()
  assert params["w"].tolist() == [1.0, 1.0, 1.0] and meta["rerun"]


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  """Issue 52 item 4: the newest checkpoint damaged (a disk that filled mid-save): the previous one is restored
  with one line, the damaged one deleted; with none readable, the error names the folder to delete."""
  from clclm_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from clclm_jax.train.errors import ConfigError  # pylint: disable=g-import-not-at-top
  state = lambda v: {"params": {"w": jax.numpy.full(3, v)}, "step": jax.numpy.int32(v)}  # noqa: E731
  ckpts = checkpoint.Checkpoints(tmp_path)
  for step in (4, 8):
    ckpts.save_latest(state(step), {"epoch": step}, {"step": step})
  ckpts.close()
  for f in (tmp_path / "checkpoints" / "latest" / "8" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\0" * 7)  # damaged
  said = []
  again = checkpoint.Checkpoints(tmp_path)
  restored, data, meta = again.restore_latest(state(0), log=said.append)
  assert int(restored["step"]) == 4 and data == {"epoch": 4} and meta == {"step": 4}
  assert len(said) == 1 and said[0].endswith("deleted, going on from step 4") and "latest/8 is unreadable" in said[0]
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == ["4"]
  again.save_latest(state(8), {"epoch": 8}, {"step": 8})  # the rerun saves step 8 anew
  again.close()
  for f in (tmp_path / "checkpoints" / "latest").rglob("*"):
    if f.is_file() and "state" in f.parts:
      f.write_bytes(b"\0" * 7)
  with pytest.raises(ConfigError, match=r"no readable checkpoint in .*latest \(step 4: .*\): delete that folder"):
    checkpoint.Checkpoints(tmp_path).restore_latest(state(0), log=said.append)
