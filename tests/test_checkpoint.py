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
