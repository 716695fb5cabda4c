"""train.py then eval.py on configs/tiny.py (and tiny_fused.py): metrics files, summary, timing; bad overrides."""

import ast
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import pytest

from clclm_jax.train import cli, evaluate, malloc

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
  assert test["n"] == 64 and 0.0 <= test["auc"] <= 1.0 and 0.0 <= test["like_ratio_auc"] <= 1.0
  assert "test AUC" in train.stdout and "valid AUC" in train.stdout
  assert f"history like-ratio on the same prompts: {test['like_ratio_auc']:.4f}" in train.stdout
  assert f"run folder        {tmp_path} (config.json" in train.stdout
  assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert list((tmp_path / "tensorboard").glob("events.*"))
  preds = [json.loads(l) for l in (tmp_path / "eval" / "test_predictions.jsonl").read_text().splitlines()]
  records = [r["record"] for r in preds]
  assert len(preds) == 64 and records == sorted(set(records)) and all(0 <= r["p_yes"] <= 1 for r in preds)
  assert evaluate.auc([r["p_yes"] for r in preds], [r["label"] for r in preds]) == pytest.approx(test["auc"])
  assert wall < 60, f"tiny train + eval took {wall:.0f}s"
  # TALLRec's cross-domain test: the book-trained run scores movie prompts, keeping its own book files.
  own = (tmp_path / "eval" / "test_metrics.json").read_text()
  ev = _run("eval.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.data.domain=movie")
  assert ev.returncode == 0, ev.stderr[-3000:]
  movie = json.loads((tmp_path / "eval" / "test_movie_metrics.json").read_text())
  assert movie["n"] == 64 and movie["domain"] == "movie" and movie["trained_on"] == "book"
  assert (tmp_path / "eval" / "test_metrics.json").read_text() == own
  preds = [json.loads(l) for l in (tmp_path / "eval" / "test_movie_predictions.jsonl").read_text().splitlines()]
  assert evaluate.auc([r["p_yes"] for r in preds], [r["label"] for r in preds]) == pytest.approx(movie["auc"])


def test_tiny_fused_recipe_then_eval_scores_the_saved_model(tmp_path, data_root):
  """configs/tiny_fused.py as it is, the sequence augmentation (seq_cl) on in encoder pretraining and stage 2: the
  default suite's end-to-end run of the recipe with it (the resume, sharding and feedback tests turn it off)."""
  train = _run("train.py", "--config=configs/tiny_fused.py", f"--workdir={tmp_path}")
  assert train.returncode == 0, train.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["shots"] == 16 and 0.0 <= summary["encoder_valid_auc"] <= 1.0
  assert "encoder valid AUC" in train.stdout and "test AUC" in train.stdout
  read = lambda path: [json.loads(l) for l in path.read_text().splitlines()]  # noqa: E731
  rows, text, encoder = (read(tmp_path / sub / "metrics.jsonl") for sub in ("", "text", "encoder"))
  assert [r["step"] for r in text] == [1, 2] and [r["step"] for r in rows] == [1, 2]  # stage 1, stage 2 (fused)
  assert rows[-1]["valid/auc"] == summary["valid_auc"] and all("train/loss" in r for r in rows + text + encoder)
  assert encoder[-1]["valid/auc"] <= summary["encoder_valid_auc"] == max(r.get("valid/auc", 0) for r in encoder)
  assert all((tmp_path / sub / "curves.png").read_bytes()[:4] == b"\x89PNG" for sub in ("", "text", "encoder"))
  ev = _run("eval.py", "--config=configs/tiny_fused.py", f"--workdir={tmp_path}", "--split=test")
  assert ev.returncode == 0, ev.stderr[-3000:]
  test = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
  assert test["n"] == 16 and test["best_step"] == 2 and test["like_ratio_auc"] == summary["test_like_ratio_auc"]
  assert abs(test["auc"] - summary["test_auc"]) < 1e-6  # the restored encoder, projector and LoRA score the same
  preds = [json.loads(l) for l in (tmp_path / "eval" / "test_predictions.jsonl").read_text().splitlines()]
  assert len(preds) == 16 and evaluate.auc([r["p_yes"] for r in preds], [r["label"] for r in preds]) == test["auc"]
  other = _run("eval.py", "--config=configs/tiny_fused.py", f"--workdir={tmp_path}", "--config.data.domain=movie")
  assert other.returncode == 1 and "Traceback" not in other.stderr
  assert "was trained on book: its encoder's item table holds book's item ids" in other.stderr
  r = _run("eval.py", "--config=configs/tiny_fused.py", f"--workdir={tmp_path}", "--export_peft=/tmp/x")
  assert r.returncode != 0 and "encoder + projector" in r.stderr and "Traceback" not in r.stderr


def test_user_errors_are_one_line_without_traceback(tmp_path):
  r = _run("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.data.files.train=nope.json",
           "--config.data.files.valid=nope.json", "--config.data.test_size=0")
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: config.data.files.train='nope.json': no such file (looked in the working directory and in "
      "CLCLM_DATA); give an absolute path")
  r = _run("eval.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", f"--compare_to={tmp_path / 'other'}")
  assert r.returncode == 1 and "score that run first" in r.stderr and "Traceback" not in r.stderr


def test_bad_overrides_are_one_clear_line():
  r = _run("train.py", "--config=configs/tiny.py", "--config.train.nope=1")
  assert r.returncode != 0 and "config has no field 'nope'" in r.stderr and "Traceback" not in r.stderr
  r = _run("eval.py", "--config=configs/tiny.py", "--config.train.batch_size=abc")
  assert r.returncode != 0 and "batch_size" in r.stderr and "Traceback" not in r.stderr


def test_compilation_cache_goes_to_clclm_cache(tmp_path, monkeypatch):
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
            jax.config.jax_compilation_cache_max_size)
  monkeypatch.setenv("CLCLM_CACHE", str(tmp_path))
  try:
    path = cli.enable_compilation_cache(0.25, max_bytes=2**20)
    assert path == tmp_path / "xla" and jax.config.jax_compilation_cache_dir == str(path)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    assert jax.config.jax_compilation_cache_max_size == 2**20
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    jax.config.update("jax_compilation_cache_max_size", before[2])


_REEXEC = ("import os; print('start', flush=True); from clclm_jax.train import malloc; "
           "malloc.reexec_keeping_freed_memory(); print(os.environ.get('MALLOC_TRIM_THRESHOLD_'))")


def test_entry_points_rerun_once_with_malloc_that_keeps_freed_memory():
  pinned = {k: "" for k in malloc.KEEP_FREED}  # Whatever the caller's environment, start without them.
  r = _run("-c", _REEXEC, env={**pinned, malloc.OPT_OUT: ""})
  assert r.returncode == 0, r.stderr
  if not malloc.needs_reexec({}):
    pytest.skip("not Linux + glibc: the entry points run as they are")
  assert r.stdout.split() == ["start", "start", malloc.KEEP_FREED["MALLOC_TRIM_THRESHOLD_"]]
  opted_out = _run("-c", _REEXEC, env={**pinned, malloc.OPT_OUT: "1"})
  assert opted_out.stdout.split() == ["start"], opted_out.stderr


def test_entry_points_rerun_before_importing_jax():
  """The re-exec comes before any heavy import, so a command pays jax's ~3 s import once, not twice."""
  light = _run("-c", "import sys; from clclm_jax.train import malloc; import clclm_jax; print('jax' in sys.modules)")
  assert light.stdout.split() == ["False"], light.stderr
  for f in ("train.py", "eval.py", *(f"benchmarks/{b}.py" for b in (
      "throughput", "profile_ours", "fused_quality", "quality", "pretrain_encoder", "memory_plan", "xla_flags"))):
    body = ast.parse((ROOT / f).read_text()).body
    first_guard = next(i for i, n in enumerate(body) if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    assert ast.unparse(body[first_guard].body[0]) == "malloc.reexec_keeping_freed_memory()", f
    assert [ast.unparse(n) for n in body[1:first_guard]] == ["from clclm_jax.train import malloc"], f


def test_kept_freed_memory_stops_xla_temporaries_faulting_in_every_call():
  """Steady state: the median call of ten after two warm-ups faults in no page of its 64 MB temporary (under
  jax 0.11 / 0.12 a few of the first ~8 calls still fault all of it, then none do; under 0.10 none do)."""
  code = ("import resource, jax, jax.numpy as jnp\n"
          "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())\n"  # a 64 MB temporary, freed after each call
          "x = jnp.ones((4096, 512))\n"
          "f(x).block_until_ready(); f(x).block_until_ready()\n"
          "for _ in range(10):\n"
          "  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "  f(x).block_until_ready()\n"
          "  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")
  if not malloc.needs_reexec({}):
    pytest.skip("not Linux + glibc")
  kept = _run("-c", code, env=malloc.KEEP_FREED)
  assert kept.returncode == 0, kept.stderr
  faults = [int(n) for n in kept.stdout.split()]
  assert statistics.median(faults) < 1000, f"page faults per call {faults} with {malloc.KEEP_FREED}"


def test_unpaired_cache_files_are_dropped_so_cache_writes_keep_working(tmp_path):
  """A program cached before the size cap has no `-atime` file; JAX's capped cache then failed every write."""
  for name in ("a-cache", "a-atime", "old-cache", "stray-atime"):
    (tmp_path / name).write_bytes(b"x")
  assert sorted(f.name for f in cli.drop_unpaired_cache_files(tmp_path)) == ["old-cache", "stray-atime"]
  assert sorted(f.name for f in tmp_path.iterdir()) == ["a-atime", "a-cache"]


def test_compilation_cache_drops_least_recently_used_beyond_its_cap(tmp_path):
  code = ("import jax, jax.numpy as jnp\n"
          "from clclm_jax.train import cli\n"
          "path = cli.enable_compilation_cache(0, max_bytes=10_000)\n"
          "for i in range(12):\n"
          "  jax.jit(lambda x: jnp.sin(x) * i + jnp.cos(x) ** i)(jnp.ones(8 + i)).block_until_ready()\n"
          "print(sum(f.stat().st_size for f in path.rglob('*-cache')), len(list(path.rglob('*-cache'))))\n")
  r = _run("-c", code, env={"CLCLM_CACHE": str(tmp_path)})
  assert r.returncode == 0, r.stderr[-2000:]
  total, entries = map(int, r.stdout.split())
  assert total <= 10_000 and 0 < entries < 12


def test_train_checks_the_data_a_config_reads_before_building_anything(tmp_path):
  r = _run("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", env={"CLCLM_DATA": str(tmp_path / "no")})
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().endswith(f"python -m clclm_jax.data fetch --only book --out {tmp_path / 'no'}")
  import train  # pylint: disable=g-import-not-at-top
  from configs import movie, pretrain_ml100k, tiny  # pylint: disable=g-import-not-at-top
  two = tiny.get_config()
  two.stages = ("instruct", "rec")
  assert train.data_groups(two) == ["book", "instruct"] and train.data_groups(movie.get_config()) == ["movie"]
  assert train.data_groups(pretrain_ml100k.get_config()) == ["movie"]
  own = tiny.get_config()
  own.data.files.train = "mine.json"
  assert train.data_groups(own) == []
