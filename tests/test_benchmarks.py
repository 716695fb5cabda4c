"""Benchmark plumbing: timing helpers, FLOP counts, throughput on the tiny model, quality tables, README markers."""

import dataclasses
import importlib
import json
import pathlib
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import compile_time  # pylint: disable=g-import-not-at-top,wrong-import-position
import eval_padding  # pylint: disable=g-import-not-at-top,wrong-import-position
import fused_quality  # pylint: disable=g-import-not-at-top,wrong-import-position
import label_signal  # pylint: disable=g-import-not-at-top,wrong-import-position
import memory_plan  # pylint: disable=g-import-not-at-top,wrong-import-position
import probe_text_only  # pylint: disable=g-import-not-at-top,wrong-import-position
import quality  # pylint: disable=g-import-not-at-top,wrong-import-position
import readme_results  # pylint: disable=g-import-not-at-top,wrong-import-position
import seqrec_table  # pylint: disable=g-import-not-at-top,wrong-import-position
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position
import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.contrastive import pretrain  # pylint: disable=wrong-import-position
from clclm_jax.contrastive.fusion import FusionConfig  # pylint: disable=wrong-import-position
from clclm_jax.data import nextitem, sequences, tallrec  # pylint: disable=wrong-import-position
from clclm_jax.data.records import Catalogue, Interaction, Item  # pylint: disable=wrong-import-position
from clclm_jax.model.config import LoraConfig, presets  # pylint: disable=wrong-import-position
from clclm_jax.model.llama import Llama  # pylint: disable=wrong-import-position
from clclm_jax.model.lora import add_lora  # pylint: disable=wrong-import-position
from clclm_jax.seqrec import baselines  # pylint: disable=wrong-import-position
from clclm_jax.train import sharding, trainer  # pylint: disable=wrong-import-position


def test_interleaved_times_alternates_and_excludes_warmup():
  calls = []
  fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
  times = common.interleaved_times(fns, repeats=3, warmup=1)
  assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
  assert [len(t) for t in times.values()] == [3, 3]
  s = common.summarize([3.0, 1.0, 2.0])
  assert s["median_s"] == 2.0 and s["min_s"] == 1.0 and s["max_s"] == 3.0


def test_writers_and_formatting(tmp_path):
  path = common.write_json(tmp_path / "x" / "r.json", {"a": np.float32(1.5), "b": np.arange(2)})
  assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1]}
  assert common.markdown_table(["x", "y"], [[1, 2]]).splitlines() == ["| x | y |", "| --- | --- |", "| 1 | 2 |"]
  assert common.si(2.5e11, "FLOP/s") == "250 GFLOP/s"
  m = common.machine()
  assert m["cores"] >= 1 and m["versions"]["jax"] == jax.__version__


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m"])
def test_flop_count_uses_the_model_parameter_count(preset):
  cfg, lora = presets[preset], LoraConfig()
  model = nnx.eval_shape(lambda: add_lora(Llama(cfg, rngs=nnx.Rngs(0)), lora, jax.random.key(0)))
  sizes = [int(np.prod(v.shape)) for path, v in nnx.to_flat_state(nnx.state(model))
           if "layers" in path and path[-1] in ("kernel", "lora_a", "lora_b")]
  body, head = throughput.matmul_params(cfg, lora)
  assert body == sum(sizes) and head == cfg.hidden_size * cfg.vocab_size
  one = throughput.forward_flops(cfg, lora, [10], head_rows=1)
  assert one == 2 * body * 10 + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 100 + 2 * head
  assert throughput.train_flops(cfg, lora, 2, 10) == 2 * throughput.forward_flops(cfg, lora, [10, 10])


def test_throughput_script_on_tiny_model(tmp_path, data_root):
  del data_root
  result = throughput.main(["--model", "tiny", "--out", str(tmp_path), "--train-batch", "2", "--train-len", "64",
                            "--score-prompts", "4", "--score-batch", "2", "--repeats", "1", "--peak-repeats", "2"])
  run = result["runs"][0]
  for task, unit in (("train", "tokens"), ("score", "prompts")):
    d = run[task]
    assert set(d["ratios"]) == {"ours", "ours_bf16"}  # on CPU ours runs in float32 and in bfloat16
    for system, ratio in d["ratios"].items():
      assert d[system][f"{unit}_per_s"] > 0 and d["transformers"][f"{unit}_per_s"] > 0
      assert ratio == pytest.approx(d[system][f"{unit}_per_s"] / d["transformers"][f"{unit}_per_s"])
    assert d["ratio"] == max(d["ratios"].values()) and d["ratios"][d["best"]] == d["ratio"]
    assert set(d["peaks_in_run"]) == {"float32", "bfloat16"} and min(d["peaks_in_run"].values()) > 0
    assert not {"matmul_float32", "matmul_bfloat16"} & set(d)  # the probes are not systems
  assert run["train"]["work"] == 2 * 64 and run["score"]["prompts"] == 4
  diffs = run["score"]["max_abs_diff_p_yes_by_system"]  # Same weights (int8 vs float) and prompts on both sides.
  assert diffs["ours"] < 1e-2 and diffs["ours_bf16"] < 5e-2
  saved = json.loads((tmp_path / "throughput_cpu.json").read_text())
  assert saved["runs"][0]["score"]["ratio"] == pytest.approx(run["score"]["ratio"])
  assert "scoring prompts/s" in (tmp_path / "throughput_cpu.md").read_text()
  run["train"]["met"], run["score"]["met"], run["train"]["best"] = True, False, "ours_bf16"
  note = throughput.missed_goal_note(result, "results/")
  assert note[0].startswith("Ceiling on this host (cpu, bfloat16 matmuls at the peak probed between the systems'")
  assert note[1:] == ["A goal is missed; where our time goes: [profile_cpu.md](results/profile_cpu.md) (`python "
                      "benchmarks/profile_ours.py --dtype bfloat16 --tag cpu`, our faster path here)."]
  run["score"]["met"] = True
  assert not throughput.missed_goal_note(result, "results/")


def test_eval_padding_counts_tokens_after_the_shared_prefix_up_to_the_answer():
  tokens = np.zeros((3, 8), np.int32)
  tokens[:2, :3] = [5, 6, 7]  # the shared prefix
  tokens[0, 3:6], tokens[1, 3:5] = 9, 8
  batch = {"tokens": tokens, "answer_index": np.array([5, 4, 0]), "index": np.array([0, 1, -1])}  # row 2: fill
  got = eval_padding.padding([batch])
  assert got["prefix"] == 3 and got["real_tokens"] == 3 + 2 and got["padded_tokens"] == 3 * 5
  assert got["padding_share"] == pytest.approx(10 / 15) and got["widths"] == [8]


def test_gpu_kit_parses_and_names_its_steps():
  kit = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_kit.sh"
  assert subprocess.run(["bash", "-n", str(kit)], capture_output=True).returncode == 0
  usage = subprocess.run(["bash", str(kit)], capture_output=True, text=True)
  assert usage.returncode == 2 and "prepare|run" in usage.stderr
  assert "--model=smollm2-135m-random" in kit.read_text() and "smollm2-135m-random" in throughput.RANDOM


def test_xla_flags_reports_a_rejected_flag_and_speedups_against_the_first_default():
  bad = xla_flags.run_variant("--xla_cpu_no_such_flag=true", repeats=1)  # XLA refuses it before any model loads
  assert bad["flags"] == "--xla_cpu_no_such_flag=true" and "xla_cpu_no_such_flag" in bad["error"]
  timed = lambda train, score: {"train": {"median_s": train}, "score": {"median_s": score}}  # noqa: E731
  result = {"tag": "cpu", "argv": ["--variants", "default", "YNNPACK individual dots"], "machine": common.machine(),
            "loadavg_before": [0.0] * 3, "loadavg_after": [0.0] * 3,
            "runs": [{"name": "default (first)", "flags": "", **timed(4.0, 8.0)},
                     {"name": "oneDNN dot fusions", **bad},
                     {"name": "default (last)", "flags": "", **timed(5.0, 8.0)}]}
  md = xla_flags.markdown(result)
  assert "| default (first) | - | 4.00 s | 1.00x | 8.00 s | 1.00x |" in md
  assert "| default (last) | - | 5.00 s | 0.80x | 8.00 s | 1.00x |" in md
  assert "| oneDNN dot fusions | `--xla_cpu_no_such_flag=true` | failed: " in md
  assert "`python benchmarks/xla_flags.py --variants default 'YNNPACK individual dots'`" in md


def test_ceiling_runs_each_prompt_after_the_shared_prefix_and_the_prefix_once():
  cfg = presets["smollm2-135m"]
  run = {"device": "cpu", "config": cfg.to_hf_dict(), "dtype": "float32", "ours_dtypes": {"ours": "float32"},
         "train": {"flops": 3e11, "goal": 1.2, "ratio": 0.9, "best": "ours", "transformers": {"median_s": 3.0}},
         "score": {"prompts": 4, "prompt_tokens": {"mean": 100.0}, "shared_prefix_tokens": 40, "goal": 2.0,
                   "ratio": 1.3, "transformers": {"median_s": 2.0}}}
  body, head = throughput.matmul_params(cfg, throughput.LORA)
  flops, tokens = throughput.scoring_matmul_flops(run)
  assert tokens == 4 * 60 + 40 and flops == 2 * body * tokens + 2 * head * 4
  note = throughput.peak_bound_note(run, {"float32": 1e11})
  assert "in 3.00 s = 1.00x transformers (goal 1.2x, measured 0.90x)" in note
  assert f"in {flops / 1e11:.2f} s = {2.0 / (flops / 1e11):.2f}x (goal 2.0x, measured 1.30x)" in note
  run["train"]["peaks_in_run"], run["score"]["peaks_in_run"] = {"float32": 5e10}, {"float32": 2e11}
  note = throughput.peak_bound_note(run, {"float32": 1e11})  # each task's own probed peak replaces the early one
  assert "50 GFLOP/s while training, 200 GFLOP/s while scoring; 100 GFLOP/s before the run" in note
  assert "in 6.00 s = 0.50x transformers" in note and f"in {flops / 2e11:.2f} s = {2.0 / (flops / 2e11):.2f}x" in note


def test_memory_plan_counts_the_frozen_base_and_grows_with_the_batch():
  small, large = (memory_plan.compiled_plan(presets["tiny"], b, 64, remat=False) for b in (1, 8))
  assert small["frozen_bytes"] == large["frozen_bytes"] > 0 and small["trainable_bytes"] > 0
  assert small["argument_bytes"] >= small["frozen_bytes"] + small["trainable_bytes"]
  assert large["temp_bytes"] > small["temp_bytes"]
  assert small["peak_bytes"] == (small["argument_bytes"] + small["output_bytes"] - small["alias_bytes"]
                                 + small["temp_bytes"])


def test_llama7b_section_judges_memory_before_mfu():
  gib = 2**30
  plan = {"peak_bytes": 20 * gib}
  run = lambda remat, peak, mfu: {"remat": remat, "plan": plan, "median_s": 1.0, "tokens_per_s": 4096.0,  # noqa: E731
                                  "mfu_vs_measured_peak": mfu, "peak_bytes_in_use": peak * gib}
  g = {"batch": 8, "length": 512, "matmul_peak": {"flop_per_s": 7e14}, "goals": {"peak_gib": 16, "mfu": 0.4}}
  text = "\n".join(throughput.llama7b_lines({**g, "runs": [run(True, 12, 0.35), run(False, 60, 0.5)]}))
  assert "memory met (remat on); MFU 35.0% against >= 40%: missed" in text  # the faster run does not fit
  text = "\n".join(throughput.llama7b_lines({**g, "runs": [run(True, 20, 0.45), {"remat": False, "plan": plan,
                                                                                 "error": "RESOURCE_EXHAUSTED"}]}))
  assert "memory goal missed" in text and "| no | failed |" in text


def _fused_results(tmp_path) -> pathlib.Path:
  """A fused_quality results.json as the script writes it: movie 16 shots, two seeds, a 16-prompt subset."""
  cell = {"domain": "movie", "test_size": 16, "test_total": 1000, "test_seed": 0, "batch_size": 8, "lr": 1e-3,
          "train_s": 60.0, "score_s": 30.0}
  rows = [{**cell, "variant": "zero_shot", "shots": 0, "seed": None, "stage1_steps": 0, "stage2_steps": 0,
           "auc": 50.0, "run": 0}]
  for seed, auc in ((0, 60.0), (1, 62.0)):
    rows += [{**cell, "variant": "text_only", "shots": 16, "seed": seed, "stage1_steps": 2, "stage2_steps": 0,
              "auc": auc, "run": seed},
             {**cell, "variant": "fused", "shots": 16, "seed": seed, "stage1_steps": 2, "stage2_steps": 2,
              "auc": auc + 10, "run": seed}]
  runs = [{"command": f"python benchmarks/fused_quality.py --seeds {i}", "wall_s": 60.0,
           "loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [1.0, 1.0, 1.0]} for i in range(2)]
  meta = {"movie": {"test_size": 16, "test_total": 1000, "test_seed": 0, "batch_size": 8, "optim": {"lr": 1e-3},
                    "like_share_auc": 70.0}}
  return common.write_json(tmp_path / "fused" / "results.json",
                           {"machine": common.machine(), "runs": runs, "meta": meta, "rows": rows})


def test_fused_quality_merge_and_markdown(tmp_path):
  result = json.loads(_fused_results(tmp_path).read_text())
  redo = {**result["rows"][1], "auc": 1.0, "run": 2}
  merged = fused_quality.merge_rows(result["rows"], [redo])
  assert len(merged) == len(result["rows"]) and merged[-1]["auc"] == 1.0
  assert [r["auc"] for r in merged].count(60.0) == 0  # the re-measured row replaced, not duplicated
  whole = {**result["rows"][2], "test_size": 1000, "auc": 75.0}
  result["rows"].append(whole)
  result["meta"][fused_quality.meta_key("movie", 1000, 1000)] = {**result["meta"]["movie"], "test_size": 1000}
  result["runs"][0]["stopped"] = "MemoryError: out of memory"
  text = fused_quality.markdown(result)
  assert "--seeds 0` (1.0 min, load 1.0), stopped early by MemoryError: out of memory" in text
  assert "A slice, not the full protocol" in text and "- movie: test subset 16 of 1000" in text
  assert "- movie, whole test set: all 1000 test prompts" in text
  assert "| movie | 16/1000 | 16 | fused | 2+2 | 71.00 ± 1.41 | 0,1 |" in text
  assert "| movie | all | 16 | fused | 2+2 | 75.00 | 0 |" in text
  assert "| movie | 16/1000 | - | zero_shot | 0+0 | 50.00 | - |" in text
  assert "`python benchmarks/fused_quality.py --seeds 1`" in text
  # a row trained under `--set` overrides measures something else: it neither replaces nor averages with the others
  lower = {**result["rows"][2], "overrides": {"optim.lr": 3e-4}, "auc": 40.0}
  assert len(fused_quality.merge_rows(result["rows"], [lower])) == len(result["rows"]) + 1
  result["rows"].append(lower)
  text = fused_quality.markdown(result)
  assert "| movie | 16/1000 | 16 | fused | 2+2 | 71.00 ± 1.41 | 0,1 |" in text
  assert "| movie | 16/1000 | 16 | fused optim.lr=0.0003 | 2+2 | 40.00 | 0 |" in text


def test_fused_quality_overrides_reach_the_config():
  args = fused_quality.parse_args(["--set", "optim.lr=3e-4", "--set", "train.eval_every=8"])
  assert args.overrides == {"optim.lr": 3e-4, "train.eval_every": 8}
  c = common.apply_overrides(fused_quality.CONFIGS["book"].get_config(), args.overrides)
  assert (c.optim.lr, c.train.eval_every) == (3e-4, 8)


def test_fused_quality_pairs_the_recipe_with_each_variant_on_the_same_prompts(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  cell = {"shots": 16, "stage1_steps": 8, "stage2_steps": 8}
  line = lambda p: ",".join(f"{x:.5f}" for x in p)  # noqa: E731  # as fused_quality stores P(Yes)
  rows = [{**cell, "variant": v, "seed": seed, "p_yes": line(labels * strength + rng.random(200))}
          for seed in (0, 1) for v, strength in (("fused+align_cl", 0.6), ("fused", 0.2), ("text_only", 0.0))]
  rows.append({**cell, "variant": "fused", "seed": 2, "p_yes": line(rng.random(200))})  # no recipe row to pair
  pairs = fused_quality.paired(rows, list(labels), "fused+align_cl", resamples=200)
  assert [(c["b"], c["seeds"]) for c in pairs] == [("text_only", [0, 1]), ("fused", [0, 1])]
  assert all(c["difference"] > 0 and c["ci95"][0] > 0 and c["n"] == 200 for c in pairs)
  result = json.loads(_fused_results(tmp_path).read_text())
  result["meta"]["movie"]["paired"] = pairs
  text = fused_quality.markdown(result)
  c = pairs[1]
  assert (f"| 16 | 8+8 | fused+align_cl | fused | 0,1 | {100 * c['auc_a']:.2f} | {100 * c['auc_b']:.2f} | "
          f"{100 * c['difference']:+.2f} | {100 * c['ci95'][0]:+.2f} .. {100 * c['ci95'][1]:+.2f} | 0.0% |") in text


def test_fused_quality_keeps_valid_rows_apart_from_test_rows(tmp_path):
  result = json.loads(_fused_results(tmp_path).read_text())
  test_row = result["rows"][2]
  valid_row = {**test_row, "split": "valid", "test_total": 800, "auc": 90.0}
  assert fused_quality.row_key(valid_row) != fused_quality.row_key(test_row)
  assert len(fused_quality.merge_rows(result["rows"], [valid_row])) == len(result["rows"]) + 1
  result["rows"].append(valid_row)
  result["meta"][fused_quality.meta_key("movie", 16, 800, "valid")] = {**result["meta"]["movie"], "split": "valid",
                                                                      "test_total": 800}
  text = fused_quality.markdown(result)
  assert text.startswith("# Fused quality: TALLRec test and valid AUC x100")
  assert "- movie, valid: valid subset 16 of 800" in text
  assert "| movie | valid 16/800 | 16 | fused | 2+2 | 90.00 | 0 |  |" in text and text.endswith("|  |  |\n")
  splits = tallrec.TallrecSplits([], list(range(10)), list(range(100, 110)), None)
  assert set(fused_quality.test_subset(splits, 4, 0, "valid")) <= set(range(10))
  assert sorted(fused_quality.test_subset(splits, 0, 0)) == list(range(100, 110))


def test_fused_quality_keeps_rows_and_says_why_a_run_stopped(tmp_path, monkeypatch):
  def run_domain(domain, args, log, previous, run, meta, emit):
    emit({"domain": domain, "variant": "zero_shot", "shots": 0, "seed": None, "test_size": 16, "test_seed": 0,
          "stage1_steps": 0, "stage2_steps": 0, "auc": 55.0})
    raise MemoryError("Out of memory allocating 27395597440 bytes.\nmore")

  monkeypatch.setattr(fused_quality, "run_domain", run_domain)
  monkeypatch.setattr(fused_quality, "markdown", lambda result: "")
  with pytest.raises(MemoryError):
    fused_quality.main(["--domains", "movie", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "results.json").read_text())
  assert [r["auc"] for r in result["rows"]] == [55.0]
  assert result["runs"][-1]["stopped"] == "MemoryError: Out of memory allocating 27395597440 bytes."
  assert result["runs"][-1]["cpu"] == common.cpu_model()
  assert "run 0 stopped: MemoryError" in (tmp_path / "log.txt").read_text()


def test_fused_ablations_name_real_loss_terms_and_fusion_fields():
  weights = fused_quality.CONFIGS["movie"].get_config().stage2.loss_weights
  fields = {f.name for f in dataclasses.fields(FusionConfig)}
  for name, ablation in fused_quality.FUSED.items():
    assert set(ablation.loss_weights) <= set(weights), name
    assert set(ablation.fusion) <= fields, name
  assert fused_quality.FUSED["fused-seq_cl"].loss_weights == {"seq_cl": 0.0}
  plain = fused_quality.stage2_weights("fused")
  assert plain["hint_kd"] == plain["align_cl"] == 0.0 and plain["seq_cl"] > 0 and plain["text_cl"] > 0
  assert fused_quality.stage2_weights("fused-seq_cl") == {**plain, "seq_cl": 0.0}
  assert fused_quality.stage2_weights("fused+hint_kd-text_cl") == {**plain, "hint_kd": 1.0, "text_cl": 0.0}
  nonzero = lambda w: {k: v for k, v in w.items() if v}  # noqa: E731
  for domain, recipe in common.SOFT_TOKEN_RECIPES.items():  # the soft-token rows are what those configs train
    config = fused_quality.CONFIGS[domain].get_config()
    assert nonzero(fused_quality.stage2_weights(recipe)) == nonzero(dict(config.stage2.loss_weights))
  for domain, recipe in common.RECIPES.items():  # the issue table's "recipe" rows are what configs/<domain>.py trains
    config = importlib.import_module(f"configs.{domain}").get_config()
    assert nonzero(fused_quality.stage2_weights(recipe)) == nonzero(dict(config.stage2.loss_weights))
    assert fused_quality.FUSED[recipe].fusion == {"mode": config.fusion.mode}


def test_quality_reads_the_fused_results(tmp_path, data_root):
  del data_root
  fused = _fused_results(tmp_path)
  data = json.loads(fused.read_text())
  data["runs"][1]["stopped"] = "MemoryError: out of memory"
  data["runs"][1]["cpu"] = "Test CPU"
  data["rows"].append({**data["rows"][1], "split": "valid", "auc": 99.0})  # chooses variants; never reported
  fused.write_text(json.dumps(data))
  result = quality.main(["--out", str(tmp_path), "--fused", str(fused), "--domains", "movie"])
  rows = {(r["method"], r["test_n"], r["seed"]): r for r in result["rows"]}
  assert rows[("heuristic", 1000, None)]["auc"] == pytest.approx(0.726, abs=5e-4)  # methods.md: 72.6 on movie.
  subset = rows[("heuristic", 16, None)]
  assert subset["subset"] and subset["subset_seed"] == 0 and 0.0 <= subset["auc"] <= 1.0
  assert all(r["auc"] != pytest.approx(0.99) for r in result["rows"])
  assert rows[("lora", 16, 1)]["auc"] == pytest.approx(0.62) and rows[("lora", 16, 1)]["steps"] == "2+0"
  assert rows[("fused", 16, 0)]["command"] == "python benchmarks/fused_quality.py --seeds 0"
  assert rows[("zero_shot", 16, None)]["shots"] == 0
  assert len([r for r in result["rows"] if r["method"] == "tallrec_published"]) == 3
  text = (tmp_path / "quality.md").read_text()
  assert "SUBSET 16/1000" in text and "`python benchmarks/fused_quality.py --seeds 0`\n" in text
  assert "Model rows: the latest model run measured on " in text
  assert ("`python benchmarks/fused_quality.py --seeds 1` on Test CPU (stopped early by MemoryError: out of memory)"
          in text)
  assert "| movie | ours, fused (CLCLMRec) | 16 | 2+2 | 0,1 | SUBSET 16/1000 (seed 0) | 71.00 ± 1.41 |" in text
  assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
  # A later results file's rows replace the earlier file's in the same cell (method, domain, shots, test set) only.
  later = json.loads(fused.read_text())
  later["rows"] = [{**later["rows"][2], "auc": 55.0, "run": 0}, {**later["rows"][2], "test_size": 1000, "run": 0}]
  later_path = common.write_json(tmp_path / "later" / "results.json", later)
  result = quality.main(["--out", str(tmp_path), "--fused", str(fused), str(later_path), "--domains", "movie"])
  fused_16 = [r for r in result["rows"] if r["method"] == "fused" and r["test_n"] == 16]
  assert [(r["seed"], r["auc"], r["run"]) for r in fused_16] == [(0, pytest.approx(0.55), "later run 0")]
  assert [r["run"] for r in result["rows"] if r["method"] == "fused" and r["test_n"] == 1000] == ["later run 0"]
  assert {r["run"] for r in result["rows"] if r["method"] == "lora"} == {"fused run 0", "fused run 1"}


def test_goal_table_needs_three_seeds_and_signs_the_gap():
  def row(seed, auc, test_n=1000, steps="8+8", method="fused"):
    return {"method": method, "domain": "movie", "shots": 64, "seed": seed, "auc": auc, "test_n": test_n,
            "test_full_n": 1000, "subset": test_n < 1000, "subset_seed": 0 if test_n < 1000 else None, "steps": steps}
  rows = [row(0, 0.74), row(1, 0.76), row(2, 0.78), row(0, 0.70, 128), row(1, 0.70, 128), row(2, 0.70, 128),
          row(0, 0.74, steps="16+16"), row(1, 0.74, steps="16+16"), row(2, 0.74, steps="16+16")]
  rows += [row(s, 0.8, method=m) for s in range(3) for m in ("fused+hint_kd", "fused-seq_cl")]
  rows += [row(s, 0.9, method="fused+align_cl") for s in range(2)]
  text = quality.goal_table(rows)
  assert "| movie | 64 | 75 | 67.48 | full (1000) | 8+8 | fused | 76.00 ± 2.00 | +1.00 (met, within noise) |" in text
  assert "| movie | 64 | 75 | 67.48 | full (1000) | 8+8 | fused+hint_kd | 80.00 ± 0.00 | +5.00 (met) |" in text
  assert "| movie | 64 | 75 | 67.48 | full (1000) | 16+16 | fused | 74.00 ± 0.00 | -1.00 (missed) |" in text
  assert "fused-seq_cl" not in text  # ablations remove a part: they are not a setting of the fused model
  assert "SUBSET" not in text  # the goals are stated on the whole test set
  assert "fused+align_cl" not in text  # two seeds are not enough for a goal row
  assert "| movie | 16 | 74 | 67.24 | - | - | - | not measured on the whole test set | - |" in text


def test_issue_table_takes_whole_test_rows_and_prefers_more_seeds():
  def row(method, seed, auc, shots=16, steps="8+8", test_n=1000):
    return {"method": method, "domain": "movie", "shots": shots, "seed": seed, "auc": auc, "test_n": test_n,
            "test_full_n": 1000, "subset": test_n < 1000, "subset_seed": 0 if test_n < 1000 else None,
            "steps": steps}
  recipe = common.RECIPES["movie"]
  rows = [row(recipe, s, a) for s, a in enumerate((0.76, 0.77, 0.78))]
  rows += [row(recipe, s, 0.99, steps="32+32") for s in range(2)]  # fewer seeds: not shown
  soft = common.SOFT_TOKEN_RECIPES["movie"]
  rows += [row(f"{soft}-seq_cl", s, 0.90, test_n=128) for s in range(3)]  # subset: not shown
  rows += [row("lora", 0, 0.50, steps="8+0"), row("zero_shot", None, 0.54, shots=0, steps="0+0")]
  rows += quality.published_rows()
  lines = quality.issue_table(rows).splitlines()
  assert lines[0] == "|  | movie 16 | movie 64 | movie 256 | book 16 | book 64 | book 256 |"
  by_label = {line.split(" | ")[0][2:]: line for line in lines[2:]}
  assert by_label["TALLRec, LLaMA-7B (published)"].startswith("| TALLRec, LLaMA-7B (published) | 67.24 | 67.48 |")
  assert "| 77.00 ± 1.00 (3 seeds, 8+8) | - |" in by_label["CLCLMRec, the config's recipe (residual fusion)"]
  assert "| +3.00 (met) | - |" in by_label["recipe vs goal"]
  assert "| 54.00 | 54.00 | 54.00 | - |" in by_label["zero-shot"]  # untrained: the same in every shots column
  assert "| 50.00 (1 seed, 8+0) | - |" in by_label["TALLRec-style LoRA, text only"]
  assert set(by_label["soft-token recipe - seq_cl (book: + text_cl)"].split(" | ")[1:]) == {"-", "- |"}


def test_versus_goal_says_when_the_gap_is_under_one_standard_error():
  assert quality.versus_goal([76.0, 77.0, 78.0], 75.0) == "+2.00 (met)"  # standard error 0.58
  assert quality.versus_goal([76.0, 77.0, 78.0], 77.5) == "-0.50 (missed, within noise)"
  assert quality.versus_goal([77.0, 77.0, 77.0], 77.0) == "+0.00 (met)"


def test_readme_results_only_touches_the_marked_section(tmp_path):
  results = tmp_path / "results"
  common.write_json(results / "quality.json", {"machine": common.machine(), "model": "tiny",
                                               "rows": quality.published_rows()})
  plan = {"model": "tiny", "batch": 2, "length": 64, "remat": True, "frozen_bytes": 2**20, "argument_bytes": 2**21,
          "temp_bytes": 2**22, "peak_bytes": 2**23, "compile_s": 1.0}
  common.write_text(results / "memory_plan_cpu.md", memory_plan.markdown(
      {"backend": "cpu", "machine": common.machine(), "plans": [plan], "remat_dots": {"without": 3, "with": 3}}))
  readme, docs = tmp_path / "README.md", tmp_path / "docs" / "results.md"
  readme.write_text("# Title\n\nText.\n")
  args = ["--results", str(results), "--readme", str(readme), "--docs", str(docs)]
  readme_results.main(args)
  first = readme.read_text()
  assert first.startswith("# Title\n\nText.\n") and first.count(readme_results.START) == 1
  assert "67.24" in first and "### Train-step memory" not in first  # the README keeps the short tables
  assert "67.24" in docs.read_text() and "| tiny | 2x64 | yes |" in docs.read_text()
  readme.write_text(first + "\nAfter.\n")
  readme_results.main(args)
  assert readme.read_text() == first + "\nAfter.\n"


def test_quality_names_and_marks_every_fused_quality_variant():
  assert {"lora" if v == "text_only" else v for v in fused_quality.VARIANTS} <= set(quality.NAMES)
  assert len(quality.ABLATION_MARKERS) >= sum(m.startswith(quality.VARIANT_PREFIXES) for m in quality.NAMES)


def test_rank_corr_is_spearman_with_average_ranks_for_ties():
  a, b = np.array([1, 2, 2, 5, 3.]), np.array([3, 1, 4, 4, 9.])
  ra, rb = np.array([1, 2.5, 2.5, 5, 4]), np.array([2, 1, 3.5, 3.5, 5])  # ranks by hand
  assert probe_text_only.rank_corr(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
  assert probe_text_only.rank_corr(a, a ** 3) == pytest.approx(1.0)
  assert probe_text_only.rank_corr(a, -a) == pytest.approx(-1.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert np.isnan(probe_text_only.rank_corr(a, np.full(5, 7.0)))


def test_label_signals_count_histories_never_targets():
  items = Catalogue([Item(1, "Red Fox Tales", "Ann"), Item(2, "Blue Fox Tales", "Ann"), Item(3, "Green Sea", "Bob"),
                     Item(4, "Deep Sea", "Bob"), Item(5, "Fox Tales Again", "Ann")])
  train = [Interaction(1, (1, 3), (True, False), 4, 1), Interaction(2, (1, 2, 4), (True, True, True), 3, 0)]
  test = [Interaction(3, (2, 3), (True, False), 1, 0)]
  signals = label_signal.Signals(tallrec.TallrecSplits(train, [], test, items))
  s = signals(test[0])
  assert s["like_ratio"] == pytest.approx(0.0)  # 1 liked of 2, smoothed: log(2 / 2)
  assert s["item_prior"] == pytest.approx(np.log(3 / 1))  # item 1: liked twice in histories, its target label unseen
  assert s["author_prior"] == pytest.approx(np.log(4 / 1))  # Ann's items liked 3 times elsewhere, item 2 here excluded
  assert (s["author_liked"], s["author_disliked"]) == (1, 0)
  assert s["title_similarity"] > 0  # "Blue Fox Tales" (liked) shares words with "Red Fox Tales"; "Green Sea" none
  # User 3's own rating of the target in a later prompt, and user 1's rating seen again, change nothing.
  later = [Interaction(3, (1,), (False,), 2, 1), Interaction(1, (1,), (True,), 3, 1)]
  again = label_signal.Signals(tallrec.TallrecSplits(train + later, [], test, items))
  assert again(test[0])["item_prior"] == pytest.approx(np.log(3 / 1))
  s = signals(train[0])  # target by Bob, whose "Green Sea" this user disliked
  assert (s["author_liked"], s["author_disliked"]) == (0, -1)
  assert s["author_prior"] == pytest.approx(0.0)  # Bob elsewhere: liked once, disliked once


def test_label_signal_table_shows_the_encoder_where_it_ran():
  fitted = {k: [0.6, 0.7] for k in ("16", "64", "256", "all")}
  movie = {"domain": "movie", "pool_n": 8, "signals": {"like_ratio": 0.7, "encoder": 0.78},
           "logistic_regression": fitted, "like_ratio_spearman": {"encoder": 0.705}}
  book = {"domain": "book", "pool_n": 4, "signals": {"like_ratio": 0.69}, "logistic_regression": fitted}
  machine = {"cpu": "test cpu", "cores": 2, "memory_gib": 1.0, "jax_backend": "cpu", "device": "cpu",
             "device_count": 1, "versions": {}}
  md = label_signal.markdown([movie, book], machine)
  enc = next(l for l in md.splitlines() if l.startswith("| pretrained sequence encoder"))
  assert enc.endswith("| 78.00 | - |")
  corr = [l for l in md.splitlines() if l.startswith("| rank correlation")]
  assert len(corr) == 1 and corr[0].endswith("the encoder's P(like) | 0.705 | - |")
  assert "encoder" not in label_signal.markdown([book], machine)


def test_compile_time_script_on_tiny_model(tmp_path):
  baseline = tmp_path / "llama_copy.py"  # any llama.py works as the baseline; here this checkout's
  baseline.write_text((pathlib.Path(compile_time.__file__).parent.parent / "clclm_jax/model/llama.py").read_text())
  result = compile_time.main(["--preset", "tiny", "--batch", "2", "--length", "16", "--repeats", "1",
                              "--out", str(tmp_path), "--step-time", "--step-repeats", "1", "--baseline", str(baseline)])
  labels = {(r["label"], r["step"]) for r in result["compiles"]}
  assert ("tiny scan", "train") in labels and ("tiny baseline", "score") in labels and ("32-layer scan", "train") in labels
  assert set(result["verdicts"]) == {"scan_speedup_train", "scan_speedup_score", "scan_speedup_train_xla",
                                     "scan_speedup_score_xla", "scan_speedup_train_vs_baseline",
                                     "scan_speedup_score_vs_baseline", "depth_ratio"}
  assert {r["case"] for r in result["step_times"]} >= {"train scan", "score unrolled", "train scan xla", "train baseline"}
  text = (tmp_path / "compile_time_cpu.md").read_text()
  assert "32-layer / 2-layer scan compile" in text and "Steady-state step time" in text


def test_the_readme_stays_short_and_opens_with_both_commands():
  text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
  head = "\n".join(text.splitlines()[:40])
  assert len(text) <= 12_000 and "make run" in head and "make test" in head


def test_seqrec_table_scores_every_row_on_the_same_users_and_records_the_budget(tmp_path, data_root):
  """The table's command on tiny models: each row on every user set, CALRec's seeds averaged, budgets recorded;
  the ID encoder's ranks agree with its own evaluator and the popularity row with `baselines.evaluate`."""
  del data_root
  id_set = "num_epochs=1,hidden=8,num_layers=1,eval_every=1,batch_size=512"
  argv = ["--datasets=ml100k", "--rows=popularity,id_encoder,zero_shot,calrec", "--calrec_config=tiny_calrec",
          "--seeds=0,1", "--set=calrec.mixture.steps=0,calrec.target.steps=1,data.valid_size=4",
          "--llm_users=6", f"--id_set={id_set}", f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path}", "--fresh"]
  result = seqrec_table.main(argv)
  rows = {(r["row"], r["kind"], r["users"]): r for r in result["rows"]}
  assert set(rows) == {("popularity", None, "all"), ("popularity", None, "6 seeded"), ("id_encoder", None, "all"),
                       ("id_encoder", None, "6 seeded"), ("zero_shot", None, "6 seeded"),
                       ("calrec", "generation", "6 seeded"), ("calrec", "dense", "6 seeded")}
  for r in rows.values():
    m = r["mean"]
    assert r["count"] == (943 if r["users"] == "all" else 6)
    assert 0 <= m["Recall@1"] <= m["Recall@5"] <= m["Recall@10"] <= 1
    assert m["NDCG@5"] <= m["NDCG@10"] <= m["Recall@10"] and m["Recall@1"] <= m["NDCG@5"]
    assert r["wall_s"]["eval"] > 0
  dense = rows[("calrec", "dense", "6 seeded")]
  assert dense["seeds"] == 2 and len(dense["per_seed"]) == 2 and not dense["full_recipe"]
  for k in seqrec_table.METRICS:
    values = [s[k] for s in dense["per_seed"]]
    assert dense["mean"][k] == pytest.approx(np.mean(values)) and dense["std"][k] == pytest.approx(np.std(values, ddof=1))
  assert dense["budget"] == {"calrec.mixture.steps": 0, "calrec.target.steps": 1, "data.valid_size": 4, "llm_users": 6}
  assert dense["steps_per_stage"] == {"mixture": 0, "target": 1} and dense["wall_s"]["train"] > 0
  assert rows[("popularity", None, "all")]["full_recipe"] and not rows[("id_encoder", None, "all")]["full_recipe"]
  data = nextitem.load("ml100k")
  xs = nextitem.examples(data, "test")
  want = baselines.evaluate(baselines.popularity_scorer(data), data, xs)
  assert rows[("popularity", None, "all")]["mean"] == pytest.approx({k: want[k] for k in seqrec_table.METRICS})
  users = baselines.sample_examples(xs, 6, 0)  # every row of the 6-user table scored these users
  assert rows[("popularity", None, "6 seeded")]["mean"]["NDCG@10"] == pytest.approx(
      baselines.evaluate(baselines.popularity_scorer(data), data, users)["NDCG@10"])
  cfg = seqrec_table.id_config("pretrain_{dataset}", "ml100k", -1, common.parse_overrides(id_set.split(",")))
  seqs = sequences.load("ml100k")
  model = pretrain.NextItemRec(cfg, seqs)
  trainer.run([pretrain.stage(cfg, model, seqs, pathlib.Path(rows[("id_encoder", None, "all")]["run_folders"][0]))],
              model, sharding.make_mesh((-1, 1, 1)), log=lambda _: None)  # finished: restores its best parameters
  own = pretrain.evaluate(model, seqs, "test", cfg)
  assert rows[("id_encoder", None, "all")]["mean"]["Recall@10"] == pytest.approx(own["HR@10"])
  assert rows[("id_encoder", None, "all")]["mean"]["NDCG@5"] == pytest.approx(own["NDCG@5"], abs=1e-6)
  text = (tmp_path / "seqrec_table.md").read_text()
  assert "**budget**: calrec.mixture.steps=0" in text and "## ml100k: 6 test users (6 seeded)" in text
  assert "Not run: ml100k bm25_last" in text and "beauty calrec_no_mixture" in text
  assert "best CALRec row" in text  # the goal line: CALRec against the ID encoder on the same users
  saved = json.loads((tmp_path / "seqrec_table.json").read_text())
  assert len(saved["rows"]) == len(rows) and saved["commands"][0].startswith("python benchmarks/seqrec_table.py")
  # eval.py scores a CALRec run folder: the same users and weights give the table's numbers.
  folder = pathlib.Path(dense["run_folders"][0])
  ev = subprocess.run([sys.executable, "eval.py", "--config=configs/tiny_calrec.py", f"--workdir={folder}",
                       "--config.calrec.mixture.steps=0", "--config.data.test_size=6"],
                      cwd=pathlib.Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr
  scored = json.loads((folder / "eval" / "test_metrics.json").read_text())
  assert scored["count"] == 6 and scored["dense"] == pytest.approx(dense["per_seed"][0])
  assert scored["generation"] == pytest.approx(rows[("calrec", "generation", "6 seeded")]["per_seed"][0])
