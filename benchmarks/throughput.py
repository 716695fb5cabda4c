"""Speed of LoRA rec-tuning and Yes/No scoring: clclm-jax versus transformers + PEFT (PyTorch).

  python benchmarks/throughput.py --out=benchmarks/results            # CPU, SmolLM2-135M-Instruct
  python benchmarks/throughput.py --out=benchmarks/results --gpu      # also bfloat16 and a LLaMA-7B shape

Both systems get the same weights (the SmolLM2 GGUF; ours stores them int8, transformers float32),
the same LoRA (r=8, alpha=16, dropout 0.05 on q_proj, v_proj), the same token ids and batch shapes,
and are timed in alternation in one process; reported numbers are medians, warm-up excluded. On CPU
ours runs twice, computing in float32 (`ours`) and in bfloat16 with float32 accumulation (`ours_bf16`),
against transformers in float32 as a careful CPU user runs it; a goal is met when either ratio reaches it.
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.data import pipeline, tallrec, tokenize  # pylint: disable=wrong-import-position
from clclm_jax.model import build, loading  # pylint: disable=wrong-import-position
from clclm_jax.model.config import LlamaConfig, LoraConfig, presets  # pylint: disable=wrong-import-position
from clclm_jax.model.llama import Llama  # pylint: disable=wrong-import-position
from clclm_jax.model.lora import add_lora  # pylint: disable=wrong-import-position
from clclm_jax.train import evaluate, sharding, state as state_lib, step as step_lib  # pylint: disable=wrong-import-position

GOALS = {"train": 1.2, "score": 2.0}  # ours / transformers throughput ratios to reach.
LORA = LoraConfig(r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results", help="folder for throughput_<device>.{json,md}")
  p.add_argument("--model", default=loading.SMOLLM2, choices=(loading.SMOLLM2, *RANDOM),
                 help="the SmolLM2 GGUF, or random weights of a preset's shape with SmolLM2's tokenizer (same "
                      "speed, no GGUF needed: a machine without the package or network; 'tiny' for tests)")
  p.add_argument("--domain", default="movie", choices=("movie", "book"))
  p.add_argument("--train-batch", type=int, default=4)
  p.add_argument("--train-len", type=int, default=256)
  p.add_argument("--score-prompts", type=int, default=32, help="real TALLRec test prompts to score")
  p.add_argument("--score-batch", type=int, default=8)
  p.add_argument("--score-widths", type=int, default=6,
                 help="our length buckets: batches sorted by length, padded to at most this many widths chosen "
                      "for the fewest padded tokens (configs/base.py data.eval_widths)")
  p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each system (median reported)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--peak-repeats", type=int, default=20)
  p.add_argument("--probe-calls", type=int, default=10,
                 help="matmuls per peak probe timed between the systems' repetitions (for the ceiling)")
  p.add_argument("--gpu", action="store_true", help="also run bfloat16 and a LLaMA-7B-shaped model (needs a GPU)")
  p.add_argument("--tag", default=None, help="output name suffix (default: the JAX backend)")
  return p.parse_args(argv)


# Inputs: real TALLRec prompts, identical token ids for both systems.

def tallrec_encoded(tokenizer, domain: str, split: str, n: int):
  """The first `n` examples of a TALLRec split as a grain MapDataset (encoded lazily)."""
  splits = tallrec.tallrec_splits(domain)
  interactions = getattr(splits, split)[:n]
  return pipeline.tallrec_examples(interactions, splits.catalogue, domain, tokenizer)


def train_batch(examples, batch: int, length: int) -> dict[str, np.ndarray]:
  """`batch` full rows of `length` tokens cut from concatenated TALLRec training examples (no padding)."""
  need, stream = batch * length, []
  for e in examples:
    stream.extend(e["tokens"].tolist())
    if len(stream) >= need:
      break
  if len(stream) < need:
    raise ValueError(f"{len(examples)} examples give {len(stream)} tokens, fewer than {batch}x{length}")
  tokens = np.asarray(stream[:need], np.int32).reshape(batch, length)
  ones = np.ones_like(tokens)
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy(),
          "attention_mask": ones, "loss_mask": ones}


def score_batches(examples, batch_size: int, max_widths: int) -> list[dict[str, np.ndarray]]:
  """The library's evaluation batches (sorted by length, right-padded to at most `max_widths` widths)."""
  return list(pipeline.eval_dataset(examples, batch_size=batch_size, max_widths=max_widths))


def work_inputs(tokenizer, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """The timed work: one train batch cut from real training prompts, and the scoring batches of real test
  prompts (`parse_args([])` gives the defaults other benchmarks time too)."""
  train_np = train_batch(tallrec_encoded(tokenizer, args.domain, "train", 64), args.train_batch, args.train_len)
  batches = score_batches(tallrec_encoded(tokenizer, args.domain, "test", args.score_prompts), args.score_batch,
                          args.score_widths)
  return train_np, batches


def prompt_rows(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
  """Prompt-only token ids (up to and including `answer_index`) of the real rows of a batch."""
  return [batch["tokens"][r, :batch["answer_index"][r] + 1] for r in np.flatnonzero(batch["index"] >= 0)]


# FLOP counts (the same useful work is credited to both systems).

def matmul_params(cfg: LlamaConfig, lora: LoraConfig | None) -> tuple[int, int]:
  """(parameters in per-token matmuls of the decoder layers incl. LoRA, parameters of the LM head)."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
  if lora is not None:
    outs = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": d, "gate_proj": f, "up_proj": f, "down_proj": d}
    ins = {"o_proj": q, "down_proj": f}
    per_layer += sum(lora.r * (ins.get(t, d) + outs[t]) for t in lora.targets)
  return cfg.num_hidden_layers * per_layer, d * cfg.vocab_size


def forward_flops(cfg: LlamaConfig, lora: LoraConfig | None, seq_lens, head_rows: int | None = None) -> float:
  """Forward FLOPs of sequences of the given lengths: 2 x params per token, plus 4 x L x heads x head_dim x T
  per token for attention scores and values (PaLM's count), plus the LM head on `head_rows` rows (all tokens
  when None)."""
  body, head = matmul_params(cfg, lora)
  seq_lens = np.asarray(seq_lens, np.float64)
  attn = 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
  tokens = seq_lens.sum()
  rows = tokens if head_rows is None else head_rows
  return float(2.0 * body * tokens + attn * (seq_lens**2).sum() + 2.0 * head * rows)


def train_flops(cfg: LlamaConfig, lora: LoraConfig, batch: int, length: int) -> float:
  """A LoRA step = forward + backward; the frozen base needs activation gradients only (about 1x forward),
  LoRA's weight gradients are negligible, so about 2x forward (not the 3x of full fine-tuning)."""
  return 2.0 * forward_flops(cfg, lora, [length] * batch)


# Ours.

def ours_train_fn(model: nnx.Module, batch_np: dict[str, np.ndarray], optim: ConfigDict, mesh):
  """A no-argument callable running one jitted, donated `train_step` on a fixed batch; returns the loss."""
  graphdef, params, frozen = state_lib.split_model(model)
  tx = state_lib.make_optimizer(optim)
  train_state = state_lib.init_state(params, tx, seed=0, mesh=mesh)
  step = step_lib.compile_train_step(graphdef, frozen, tx, state_lib.state_shardings(params, tx, mesh), mesh,
                                     loss_weights={"lm": 1.0})
  batch = sharding.global_batch(batch_np, mesh)

  def run() -> float:
    nonlocal train_state
    train_state, metrics = step(train_state, batch)
    return float(metrics["loss"])

  return run


def ours_score_fn(model: nnx.Module, batches, yes_no: tuple[int, int], mesh):
  """A no-argument callable scoring every prompt of `batches` with `evaluate.score`; returns P(Yes) by index."""
  graphdef, params, frozen = state_lib.split_model(model)
  params_sh, frozen_sh = sharding.state_sharding(params, mesh), sharding.state_sharding(frozen, mesh)
  params, frozen = sharding.put(params, params_sh), sharding.put(frozen, frozen_sh)
  eval_step = evaluate.compile_eval_step(graphdef, params_sh, frozen_sh, mesh, *yes_no)
  return lambda: evaluate.score(eval_step, params, frozen, batches, mesh).p_yes


# transformers + PEFT, as a careful user writes it.

def hf_model(source: pathlib.Path, lora: LoraConfig, device: str, dtype: str):
  """`AutoModelForCausalLM` (from a GGUF file or an HF folder) wrapped by PEFT LoRA."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  kw = {"dtype": getattr(torch, dtype)}
  if source.suffix == ".gguf":
    kw["gguf_file"] = source.name
    source = source.parent
  model = transformers.AutoModelForCausalLM.from_pretrained(str(source), **kw).to(device)
  model.config.use_cache = False
  cfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), task_type="CAUSAL_LM")
  return peft.get_peft_model(model, cfg)


def hf_train_fn(model, batch_np: dict[str, np.ndarray], optim: ConfigDict, device: str):
  """One AdamW step (grad-norm clipped like ours) on the same batch; returns the loss."""
  import torch  # pylint: disable=g-import-not-at-top

  ids = torch.from_numpy(batch_np["tokens"]).long().to(device)
  mask = torch.from_numpy(batch_np["attention_mask"]).long().to(device)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.b1, optim.b2), weight_decay=optim.weight_decay)

  def run() -> float:
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return run


def hf_score_fn(model, prompt_batches: list[list[np.ndarray]], yes_no: tuple[int, int], pad_id: int, device: str):
  """Scores the same prompts in the same batches: left padding to the longest in the batch, positions from
  the mask, `logits_to_keep=1`, no KV cache, `torch.inference_mode`."""
  import torch  # pylint: disable=g-import-not-at-top

  tensors = []
  for rows in prompt_batches:
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_id, np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
      ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    tensors.append(tuple(torch.from_numpy(x).to(device) for x in (ids, mask, pos)))
  pair = list(yes_no)

  def run() -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
      for ids, mask, pos in tensors:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        out.append(torch.softmax(logits[:, pair].float(), dim=-1)[:, 0])
    return torch.cat(out).cpu().numpy()

  return run


# Runs.

def optim_config() -> ConfigDict:
  """TALLRec's rec-tuning optimizer: AdamW lr 1e-4, 20 warm-up steps, clipping at 1.0."""
  return ConfigDict(dict(lr=1e-4, warmup_steps=20, total_steps=1000, schedule="constant", max_grad_norm=1.0,
                         b1=0.9, b2=0.999, weight_decay=0.0))


RANDOM = {"tiny": "tiny", "smollm2-135m-random": "smollm2-135m"}  # --model -> presets key of random weights


def random_checkpoint(preset: str, tokenizer, folder: pathlib.Path) -> pathlib.Path:
  """A random LLaMA of a preset's shape with SmolLM2's vocabulary saved as an HF folder (both systems load it)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  cfg = dict(presets[preset].to_hf_dict(), vocab_size=len(tokenizer))
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  return folder


def compare(name: str, fns: dict[str, Any], work: float, unit: str, flops: float, args,
            probes: dict[str, tuple[Any, float]] | None = None) -> dict[str, Any]:
  """Times the systems in alternation; throughput = work / median seconds; `ratio` is the best of ours.
  `probes` (dtype -> `common.matmul_probe`) run in the same alternation, so `peaks_in_run` saw the same load."""
  probes = probes or {}
  times = common.interleaved_times({**fns, **{f"matmul_{d}": fn for d, (fn, _) in probes.items()}},
                                   repeats=args.repeats, warmup=args.warmup)
  out = {"peaks_in_run": {d: f / statistics.median(times.pop(f"matmul_{d}")) for d, (_, f) in probes.items()}}
  for system, ts in times.items():
    s = common.summarize(ts)
    s[f"{unit}_per_s"] = work / s["median_s"]
    s["flop_per_s"] = flops / s["median_s"]
    out[system] = s
  out["ratios"] = {system: out[system][f"{unit}_per_s"] / out["transformers"][f"{unit}_per_s"]
                   for system in fns if system != "transformers"}
  out["best"] = max(out["ratios"], key=out["ratios"].get)
  out["ratio"] = out["ratios"][out["best"]]
  out["goal"] = GOALS[name]
  out["met"] = bool(out["ratio"] >= GOALS[name])
  out["work"], out["unit"], out["flops"] = work, unit, flops
  print(f"{name}: " + ", ".join(f"{system} {times_s:.3f} s" for system, times_s in
                                 ((k, out[k]["median_s"]) for k in fns)) +
        f"; best ratio {out['ratio']:.2f} ({out['best']})", file=sys.stderr, flush=True)
  return out


def ours_dtypes(device: str, dtype: str) -> dict[str, str]:
  """Our systems and their compute dtypes: on CPU float32 and bfloat16, elsewhere the run's dtype."""
  return {"ours": "float32", "ours_bf16": "bfloat16"} if device == "cpu" else {"ours": dtype}


def run_comparison(args, device: str, dtype: str, tmp: pathlib.Path) -> dict[str, Any]:
  """Train step and scoring, ours versus transformers + PEFT, on one device and dtype."""
  import torch  # pylint: disable=g-import-not-at-top

  if args.model in RANDOM:
    source = random_checkpoint(RANDOM[args.model], build.smollm2_tokenizer(), tmp / args.model)
  else:
    source = loading.smollm2_gguf()
  systems, load_s = ours_dtypes(device, dtype), {}
  models = {}
  for system, jax_dtype in systems.items():
    start = time.perf_counter()
    models[system], tokenizer = loading.load_model(source, dtype=jax_dtype, quantize="int8", lora=LORA)
    load_s[system] = time.perf_counter() - start
  start = time.perf_counter()
  hf = hf_model(pathlib.Path(source), LORA, device, dtype)
  load_s["transformers"] = time.perf_counter() - start
  cfg = models["ours"].config
  yes_no = tokenize.answer_token_ids(tokenizer)
  mesh = sharding.make_mesh((-1, 1, 1))

  train_np, batches = work_inputs(tokenizer, args)
  optim = optim_config()
  probes = {d: common.matmul_probe(jnp.dtype(d), calls=args.probe_calls) for d in sorted(set(systems.values()))}
  train = compare("train", {**{k: ours_train_fn(m, train_np, optim, mesh) for k, m in models.items()},
                            "transformers": hf_train_fn(hf, train_np, optim, device)},
                  work=train_np["tokens"].size, unit="tokens",
                  flops=train_flops(cfg, LORA, args.train_batch, args.train_len), args=args, probes=probes)

  rows = [prompt_rows(b) for b in batches]
  lens = [len(r) for rs in rows for r in rs]
  ours_score = {k: ours_score_fn(m, batches, yes_no, mesh) for k, m in models.items()}
  hf_score = hf_score_fn(hf, rows, yes_no, tokenizer.pad_token_id, device)
  score = compare("score", {**ours_score, "transformers": hf_score}, work=len(lens), unit="prompts",
                  flops=forward_flops(cfg, LORA, lens, head_rows=len(lens)), args=args, probes=probes)
  # Same prompts in the same order on both sides: P(Yes) should agree up to int8 (and bf16) rounding.
  order = np.argsort(np.concatenate([b["index"][b["index"] >= 0] for b in batches]), kind="stable")
  hf_p = hf_score()[order]
  score["max_abs_diff_p_yes_by_system"] = {k: float(np.max(np.abs(f() - hf_p))) for k, f in ours_score.items()}
  score["max_abs_diff_p_yes"] = score["max_abs_diff_p_yes_by_system"]["ours"]
  score["prompt_tokens"] = {"mean": float(np.mean(lens)), "min": int(min(lens)), "max": int(max(lens))}
  score["padded_tokens_ours"] = int(sum(b["tokens"].shape[1] * b["tokens"].shape[0] for b in batches))
  score["widths_ours"] = sorted({int(b["tokens"].shape[1]) for b in batches})
  score["shared_prefix_tokens"] = int(evaluate.shared_prefix(list(batches)).size)
  score["padded_tokens_transformers"] = int(sum(max(len(r) for r in rs) * args.score_batch for rs in rows))
  return {"model": args.model, "config": cfg.to_hf_dict(), "device": device, "dtype": dtype,
          "ours_dtypes": systems, "ours_storage": "int8 base + float32 LoRA",
          "transformers_storage": f"{dtype} base + {dtype} LoRA",
          "torch_threads": torch.get_num_threads(), "load_s": load_s,
          "train": {**train, "batch": args.train_batch, "length": args.train_len},
          "score": {**score, "prompts": len(lens), "batch": args.score_batch, "domain": args.domain}}


def run_llama7b_shape(args) -> dict[str, Any]:
  """A LLaMA-7B-shaped model with random weights (bfloat16 compute, int8 base, LoRA) at 8x512, with
  per-layer remat and without (in that order: the device's peak memory only grows): step time, MFU,
  the device's peak memory and the compiler's plan."""
  import memory_plan  # pylint: disable=g-import-not-at-top
  cfg, b, t = presets["llama-7b"], 8, 512
  peak = common.matmul_peak(jnp.bfloat16, shape=(8192, 8192, 8192), repeats=args.peak_repeats)
  result = {"batch": b, "length": t, "matmul_peak": peak, "goals": {"peak_gib": 16, "mfu": 0.4}, "runs": []}
  for remat in (True, False):
    run = {"remat": remat, "plan": memory_plan.compiled_plan(cfg, b, t, remat=remat)}
    try:
      run.update(_llama7b_steps(args, cfg, b, t, remat, peak["flop_per_s"]))
    except Exception as e:  # pylint: disable=broad-except  # out of device memory is a result too
      run["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    result["runs"].append(run)
  return result


def random_train_fn(cfg: LlamaConfig, b: int, t: int, *, remat: bool = False):
  """`ours_train_fn` for a random bf16 int8-base + LoRA model of `cfg`'s shape on random `b x t` tokens."""
  model = Llama(cfg, dtype=jnp.bfloat16, quantize="int8", remat=remat, rngs=nnx.Rngs(0))
  add_lora(model, LORA, jax.random.key(1))
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
  ones = np.ones_like(tokens)
  batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "attention_mask": ones, "loss_mask": ones}
  return ours_train_fn(model, batch, optim_config(), sharding.make_mesh((-1, 1, 1)))


def _llama7b_steps(args, cfg: LlamaConfig, b: int, t: int, remat: bool, peak_flop_per_s: float) -> dict[str, Any]:
  run = random_train_fn(cfg, b, t, remat=remat)
  times = common.interleaved_times({"ours": run}, repeats=args.repeats, warmup=args.warmup)["ours"]
  s = common.summarize(times)
  flops = train_flops(cfg, LORA, b, t)
  stats = jax.devices()[0].memory_stats() or {}
  return {**s, "tokens_per_s": b * t / s["median_s"], "flop_per_s": flops / s["median_s"],
          "mfu_vs_measured_peak": flops / s["median_s"] / peak_flop_per_s,
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit")}


def llama7b_lines(g: dict[str, Any], heading: str = "##") -> list[str]:
  """The LLaMA-7B-shape section: one row per remat setting, then the two goals."""
  rows = []
  for r in g["runs"]:
    planned = f"{r['plan']['peak_bytes'] / 2**30:.1f}"
    if "error" in r:
      rows.append(["yes" if r["remat"] else "no", "failed", "-", "-", "-", planned])
      continue
    rows.append(["yes" if r["remat"] else "no", f"{r['median_s'] * 1e3:.0f} ms", f"{r['tokens_per_s']:.0f}",
                 f"{100 * r['mfu_vs_measured_peak']:.1f}%", f"{(r['peak_bytes_in_use'] or 0) / 2**30:.1f}", planned])
  ok = [r for r in g["runs"] if "error" not in r]
  fits = [r for r in ok if (r["peak_bytes_in_use"] or 0) <= g["goals"]["peak_gib"] * 2**30]
  if not fits:
    verdict = "no run finished" if not ok else f"no run within {g['goals']['peak_gib']} GiB: memory goal missed"
  else:
    best = max(fits, key=lambda r: r["mfu_vs_measured_peak"])
    mfu_met = "met" if best["mfu_vs_measured_peak"] >= g["goals"]["mfu"] else "missed"
    verdict = (f"memory met (remat {'on' if best['remat'] else 'off'}); MFU {100 * best['mfu_vs_measured_peak']:.1f}% "
               f"against >= {100 * g['goals']['mfu']:.0f}%: {mfu_met}")
  return [f"{heading} LLaMA-7B shape, random weights, int8 + LoRA, bfloat16", "",
          f"Batch {g['batch']}x{g['length']}; MFU against the measured bf16 matmul peak "
          f"({common.si(g['matmul_peak']['flop_per_s'], 'FLOP/s')}); peak device memory is the process's "
          "running maximum (remat runs first); planned = XLA's compiled plan (`benchmarks/memory_plan.py`).", "",
          common.markdown_table(["remat", "step", "tokens/s", "MFU", "peak GiB", "planned GiB"], rows), "",
          f"Goals: {verdict}.", ""]


def _systems(run: dict[str, Any]) -> dict[str, str]:
  """System name -> compute dtype, ours first (runs saved before `ours_dtypes` had one system)."""
  return {**run.get("ours_dtypes", {"ours": run["dtype"]}), "transformers": run["dtype"]}


def run_table(run: dict[str, Any], peaks: dict[str, float]) -> str:
  """Median time, throughput and achieved FLOP/s of every system on both tasks; the peak is the matmul
  peak of the system's compute dtype, probed in the task's own alternation where the run has one."""
  tr, sc = run["train"], run["score"]
  rows = []
  for task, d, what in (("LoRA train step", tr, f"{tr['batch']}x{tr['length']} tokens, AdamW"),
                        ("Yes/No scoring", sc, f"{sc['prompts']} {sc['domain']} test prompts, batch {sc['batch']}")):
    for system, dtype in _systems(run).items():
      s, peak = d[system], d.get("peaks_in_run", {}).get(dtype, peaks.get(dtype))
      rows.append([task, what, system, dtype, f"{s['median_s'] * 1e3:.0f} ms",
                   f"{s[d['unit'] + '_per_s']:.1f} {d['unit']}/s", common.si(s["flop_per_s"], "FLOP/s"),
                   f"{100 * s['flop_per_s'] / peak:.0f}% ({dtype})" if peak else "-"])
  return common.markdown_table(
      ["task", "work", "system", "compute", "median time", "throughput", "model FLOP/s", "of matmul peak"], rows)


def probed_peaks_line(run: dict[str, Any]) -> list[str]:
  """The matmul peaks probed inside each task's alternation (what 'of matmul peak' divides by), if any."""
  parts = [f"{task} " + ", ".join(f"{d} {common.si(v, 'FLOP/s')}" for d, v in run[key]["peaks_in_run"].items())
           for task, key in (("training", "train"), ("scoring", "score")) if run[key].get("peaks_in_run")]
  return [f"Matmul peaks probed between the systems' repetitions (the 'of matmul peak' column): "
          f"{'; '.join(parts)}.", ""] if parts else []


def goal_table(run: dict[str, Any]) -> str:
  rows = [[task, " / ".join(f"{k} {v:.2f}x" for k, v in d.get("ratios", {"ours": d["ratio"]}).items()),
           f">= {d['goal']}x", f"met ({d.get('best', 'ours')})" if d["met"] else "missed"]
          for task, d in (("train tokens/s", run["train"]), ("scoring prompts/s", run["score"]))]
  return common.markdown_table(["goal", "ours / transformers", "target", "status"], rows)


def markdown(result: dict[str, Any]) -> str:
  peak = result["matmul_peak"]
  peaks = {p["dtype"]: p["flop_per_s"] for p in [peak] + result.get("more_peaks", [])}
  lines = [f"# Throughput: clclm-jax vs transformers + PEFT ({result['tag']})", "",
           f"Machine: {common.machine_line(result['machine'])}.",
           f"Load average before / after: {result['loadavg_before']} / {result['loadavg_after']} "
           "(both systems are timed in alternation, so any load hits both; on a shared CPU torch suffers more, "
           "so compare ratios from idle runs).",
           "Peaks measured before the run (median): " + "; ".join(
               f"XLA {p['dtype']} matmul {p['shape']} = {common.si(p['flop_per_s'], 'FLOP/s')}"
               for p in [peak] + result.get("more_peaks", [])) +
           " (bfloat16 inputs accumulate in float32, the dot our bfloat16 layers use" +
           ("; int8 ones in int32, counted as FLOPs: the dot that int8 activations would need" if "int8" in peaks
            else "") + ").", ""]
  for run in result["runs"]:
    sc = run["score"]
    lines += [f"## {run['model']} on {run['device']}, {run['dtype']} "
              f"(ours: {run['ours_storage']}; transformers: {run['transformers_storage']}, "
              f"{run['torch_threads']} torch threads)", "", run_table(run, peaks), "", *probed_peaks_line(run),
              goal_table(run), "", "Scoring agreement: max |P(Yes) ours - transformers| = " + ", ".join(
                  f"{k} {v:.3g}" for k, v in sc.get("max_abs_diff_p_yes_by_system",
                                                     {"ours": sc["max_abs_diff_p_yes"]}).items()) +
              f" (int8 vs float base). Prompt tokens mean {sc['prompt_tokens']['mean']:.0f} "
              f"(min {sc['prompt_tokens']['min']}, max {sc['prompt_tokens']['max']}); ours pads each length-sorted "
              + (f"batch to one of the widths {sc['widths_ours']} (`pipeline.batch_widths`)" if "widths_ours" in sc
                 else f"batch to a multiple of {sc.get('pad_multiple_ours', 64)} tokens")
              + "; tokens run incl. padding: "
              f"ours {sc['padded_tokens_ours']}, transformers {sc['padded_tokens_transformers']}; ours runs the "
              f"{sc.get('shared_prefix_tokens', 0)}-token instruction prefix common to all prompts once per "
              "scoring pass and reuses its keys/values, and its last layer runs the answer position's query only.", ""]
  if result.get("llama7b"):
    lines += llama7b_lines(result["llama7b"])
  lines += [FLOPS_NOTE, ""] + missed_goal_note(result, "")
  return "\n".join(lines) + "\n"


def missed_goal_note(result: dict, folder: str) -> list[str]:
  """When a speed goal is missed: the best ratio this host's matmul peak allows, and a pointer to the profile
  of our faster system; else nothing."""
  missed = [run for run in result["runs"] if not (run["train"]["met"] and run["score"]["met"])]
  if not missed:
    return []
  dtype = _systems(missed[0])[missed[0]["train"].get("best", "ours")]
  peaks = {p["dtype"]: p["flop_per_s"] for p in [result["matmul_peak"]] + result.get("more_peaks", [])}
  name = f"profile_{result['tag']}.md"
  return [peak_bound_note(run, peaks) for run in missed] + [
      f"A goal is missed; where our time goes: [{name}]({folder}{name}) "
      f"(`python benchmarks/profile_ours.py --dtype {dtype} --tag {result['tag']}`, our faster path here)."]


def scoring_matmul_flops(run: dict[str, Any]) -> tuple[float, int]:
  """(matmul FLOPs our scoring cannot skip, tokens they cover): every prompt token after the shared prefix,
  the prefix once, the LM head on one row per prompt; attention and the last layer's skipped rows not counted."""
  sc = run["score"]
  body, head = matmul_params(LlamaConfig.from_hf_dict(run["config"]), LORA)
  prefix = sc.get("shared_prefix_tokens", 0)
  tokens = round(sc["prompt_tokens"]["mean"] * sc["prompts"]) - prefix * (sc["prompts"] - 1)
  return 2.0 * body * tokens + 2.0 * head * sc["prompts"], tokens


def peak_bound_note(run: dict[str, Any], peaks: dict[str, float]) -> str:
  """The ratios ours would reach with its matmuls at the measured peak of its faster dtype and nothing else
  costing time: a goal above them needs less arithmetic, not faster kernels. Each task uses the peak probed
  in its own alternation of the systems (same load) where the run has one, else the peak measured before."""
  tr, sc = run["train"], run["score"]
  dtype = _systems(run)[tr.get("best", "ours")]
  peak_tr, peak_sc = (d.get("peaks_in_run", {}).get(dtype, peaks[dtype]) for d in (tr, sc))
  where = (f"the measured {common.si(peaks[dtype], 'FLOP/s')}" if "peaks_in_run" not in tr else
           f"the peak probed between the systems' repetitions: {common.si(peak_tr, 'FLOP/s')} while training, "
           f"{common.si(peak_sc, 'FLOP/s')} while scoring; {common.si(peaks[dtype], 'FLOP/s')} before the run")
  score_flops, tokens = scoring_matmul_flops(run)
  t_train, t_score = tr["flops"] / peak_tr, score_flops / peak_sc
  return (f"Ceiling on this host ({run['device']}, {dtype} matmuls at {where}, "
          f"every other kernel free): train step {common.si(tr['flops'], 'FLOP')} in {t_train:.2f} s = "
          f"{tr['transformers']['median_s'] / t_train:.2f}x transformers (goal {tr['goal']}x, measured "
          f"{tr['ratio']:.2f}x); scoring, counting only the matmuls over the {tokens} tokens it must run "
          f"(after the shared prefix, plus the prefix once), {common.si(score_flops, 'FLOP')} in {t_score:.2f} s = "
          f"{sc['transformers']['median_s'] / t_score:.2f}x (goal {sc['goal']}x, measured {sc['ratio']:.2f}x).")


FLOPS_NOTE = ("FLOPs: forward = 2 x matmul params x tokens + 4 x layers x heads x head_dim x T per token "
              "(attention) + the LM head on the rows that need it (all tokens in training, one per prompt in "
              "scoring); a LoRA step = 2 x forward (the frozen base needs activation gradients only). Both "
              "systems are credited the same useful FLOPs (padding not counted).")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if args.gpu and not on_gpu:
    raise SystemExit("--gpu: JAX sees no GPU (backend is %r); drop the flag on a CPU machine" % jax.default_backend())
  result = {"tag": args.tag or jax.default_backend(), "argv": sys.argv[1:] if argv is None else argv,
            "machine": common.machine(), "loadavg_before": common.loadavg()}
  result["matmul_peak"] = common.matmul_peak(jnp.bfloat16 if on_gpu else jnp.float32, repeats=args.peak_repeats)
  if not on_gpu:
    result["more_peaks"] = [common.matmul_peak(d, repeats=args.peak_repeats) for d in (jnp.bfloat16, jnp.int8)]
  with tempfile.TemporaryDirectory() as tmp:
    runs = [run_comparison(args, "cpu", "float32", pathlib.Path(tmp))] if not on_gpu else []
    if on_gpu:
      import torch  # pylint: disable=g-import-not-at-top
      if torch.cuda.is_available():
        runs.append(run_comparison(args, "cuda", "bfloat16", pathlib.Path(tmp)))
      result["llama7b"] = run_llama7b_shape(args)
  result["runs"] = runs
  result["loadavg_after"] = common.loadavg()
  common.write_result(args.out, f"throughput_{result['tag']}", result, markdown(result))
  return result


if __name__ == "__main__":
  main()
