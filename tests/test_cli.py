"""train.py then eval.py on configs/tiny.py (and tiny_fused.py): metrics files, summary, timing; bad overrides."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax

from clclm_jax.train import cli

ROOT = pathlib.Path(__file__).parents[1]


def _run(*args, timeout=300, env=None):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=None if env is None else {**os.environ, **env})


def test_tiny_train_then_eval_under_a_minute(tmp_path, data_root):
  cold = {"CLCLM_CACHE": str(tmp_path / "cache")}  # An empty XLA cache, as on a fresh machine.
  t0 = time.time()
  train = _run("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", env=cold)
  assert train.returncode == 0, train.stderr[-3000:]
  assert list((tmp_path / "cache" / "xla").iterdir()), "train.py kept no compiled programs"
  ev = _run("eval.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--split=test", env=cold)
  assert ev.returncode == 0, ev.stderr[-3000:]
  wall = time.time() - t0
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
  assert all("train/loss" in r for r in rows) and any("valid/auc" in r for r in rows)
  test = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
  assert test["n"] == 64 and 0.0 <= test["auc"] <= 1.0
  assert "test AUC" in train.stdout and "valid AUC" in train.stdout
  assert list((tmp_path / "tensorboard").glob("events.*"))
  assert wall < 60, f"tiny train + eval took {wall:.0f}s"


def test_tiny_fused_recipe_then_eval_scores_the_saved_model(tmp_path, data_root):
  train = _run("train.py", "--config=configs/tiny_fused.py", f"--workdir={tmp_path}")
  assert train.returncode == 0, train.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["shots"] == 16 and 0.0 <= summary["encoder_valid_auc"] <= 1.0
  assert "encoder valid AUC" in train.stdout and "test AUC" in train.stdout
  ev = _run("eval.py", "--config=configs/tiny_fused.py", f"--workdir={tmp_path}", "--split=test")
  assert ev.returncode == 0, ev.stderr[-3000:]
  test = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
  assert test["n"] == 16 and test["best_step"] == 4
  assert abs(test["auc"] - summary["test_auc"]) < 1e-6  # the restored encoder, projector and LoRA score the same
  r = _run("eval.py", "--config=configs/tiny_fused.py", f"--workdir={tmp_path}", "--export_peft=/tmp/x")
  assert r.returncode != 0 and "encoder + projector" in r.stderr and "Traceback" not in r.stderr


def test_bad_overrides_are_one_clear_line():
  r = _run("train.py", "--config=configs/tiny.py", "--config.train.nope=1")
  assert r.returncode != 0 and "config has no field 'nope'" in r.stderr and "Traceback" not in r.stderr
  r = _run("eval.py", "--config=configs/tiny.py", "--config.train.batch_size=abc")
  assert r.returncode != 0 and "batch_size" in r.stderr and "Traceback" not in r.stderr


def test_compilation_cache_goes_to_clclm_cache(tmp_path, monkeypatch):
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  monkeypatch.setenv("CLCLM_CACHE", str(tmp_path))
  try:
    path = cli.enable_compilation_cache(0.25)
    assert path == tmp_path / "xla" and jax.config.jax_compilation_cache_dir == str(path)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
