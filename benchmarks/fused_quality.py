"""Issue 5's table: TALLRec test AUC x100 for SmolLM2-135M-Instruct int8, zero-shot / text-only / fused.

Per (domain, shots, seed): zero-shot; text-only LoRA (stage 1, TALLRec-style prompts); fused (stage 2
from the stage-1 weights: soft tokens + the config's joint losses); fused with one loss removed
(`fused-seq_cl`, `fused-text_cl`) or added (`fused+align_cl`). The full protocol is 2 domains x
16/64/256 shots x 3 seeds on the whole test sets; flags choose a slice, and the output says which.

  python benchmarks/fused_quality.py --domains movie --shots 64 --seeds 0 --test_size 128 \
      --variants zero_shot,text_only,fused
"""

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from clclm_jax.contrastive import joint
from clclm_jax.contrastive.fusion import FusedRec, FusionConfig
from clclm_jax.data import augment, fewshot, tallrec, tokenize
from clclm_jax.model import loading
from clclm_jax.model.config import LoraConfig
from clclm_jax.train import evaluate
from configs import fused_book, fused_movie

PUBLISHED_TALLREC = {"movie": {16: 67.24, 64: 67.48, 256: 71.98}, "book": {16: 56.36, 64: 60.39, 256: 64.38}}
GOALS = {"movie": {16: 74, 64: 75, 256: 77}, "book": {16: 71, 64: 72, 256: 74}}
CONFIGS = {"movie": fused_movie, "book": fused_book}
VARIANTS = ("zero_shot", "text_only", "fused", "fused-seq_cl", "fused-text_cl", "fused+align_cl")


def stage2_weights(config, variant: str) -> dict[str, float]:
  weights = dict(config.stage2.loss_weights)
  if "-" in variant:
    weights[variant.split("-", 1)[1]] = 0.0
  if "+" in variant:
    weights[variant.split("+", 1)[1]] = 0.1
  return weights


def like_share_auc(xs) -> float:
  """The no-training reference: P(Yes) = share of liked items in the history."""
  return evaluate.auc(np.array([np.mean(x.history_likes) if x.history_likes else 0.5 for x in xs]),
                      np.array([x.label for x in xs]))


def run_domain(domain: str, args, log) -> list[dict]:
  config = CONFIGS[domain].get_config()
  f, d = config.fusion, config.data
  t0 = time.time()
  lora = LoraConfig(r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                    targets=tuple(config.lora.targets))
  llm, tokenizer = loading.load_model(config.model.source, dtype=config.model.dtype,
                                      quantize=config.model.quantize, lora=lora, lora_seed=config.seed)
  splits = tallrec.tallrec_splits(domain, seed=d.split_seed, book_valid_size=d.book_valid_size)
  num_items = splits.catalogue.max_id
  corr = augment.itemcf_iuf([np.asarray(x.history_ids) for x in splits.train], num_items, f.corr_top_k)
  placeholder_id = tokenizer.convert_tokens_to_ids(f.placeholder)
  fcfg = FusionConfig(num_items=num_items, placeholder_id=placeholder_id, num_soft_tokens=f.num_soft_tokens,
                      source=f.source, projector_hidden=f.projector_hidden, encoder_hidden=f.encoder_hidden,
                      encoder_layers=f.encoder_layers, encoder_heads=f.encoder_heads,
                      encoder_dropout=f.encoder_dropout, max_len=f.history_len, pooling=f.pooling,
                      seq_temperature=f.seq_temperature, text_temperature=f.text_temperature,
                      align_temperature=f.align_temperature)
  model = FusedRec(llm, fcfg, item_corr=corr, rngs=nnx.Rngs(config.seed))
  initial = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  text = joint.PromptSpec(domain, f.placeholder, placeholder_id, 0, cutoff_len=d.cutoff_len,
                          train_on_inputs=d.train_on_inputs, template=d.template, history_len=f.history_len,
                          view_len=f.view_len)
  fused = text.with_soft_tokens(f.num_soft_tokens)
  test = fewshot.fewshot(splits.test, args.test_size if args.test_size > 0 else None, args.test_seed)
  yes_no = tokenize.answer_token_ids(tokenizer, d.template)
  evals = {spec.num_soft_tokens: joint.eval_batches(test, splits.catalogue, tokenizer, spec,
                                                    batch_size=args.eval_batch_size, pad_multiple=d.pad_multiple)
           for spec in (text, fused)}
  log(f"{domain}: loaded in {time.time() - t0:.0f}s; test {len(test)} of {len(splits.test)}; "
      f"like-share AUC {100 * like_share_auc(test):.2f}")

  def test_auc(spec) -> float:
    p, label = joint.score(model, evals[spec.num_soft_tokens], *yes_no)
    return 100 * evaluate.auc(p, label)

  def train(spec, steps, weights, seed, pool, views=False):
    batches = joint.train_batches(pool, splits.catalogue, tokenizer, spec, batch_size=config.train.batch_size,
                                  seed=seed, views=views, pad_multiple=d.pad_multiple)
    joint.fit(model, batches, steps=steps, loss_weights=weights, optim=config.optim, seed=seed,
              log=lambda i, m: log(f"  step {i}/{steps} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()
                                                                   if k.startswith("loss"))))

  rows = []
  for shots in args.shots:
    for seed in args.seeds:
      nnx.update(model, initial)
      cell = {"domain": domain, "shots": shots, "seed": seed}

      def record(variant, auc, t):
        rows.append({**cell, "variant": variant, "auc": auc, "wall_s": time.time() - t})
        log(f"{domain} {shots}-shot seed {seed} {variant}: AUC {auc:.2f} ({time.time() - t:.0f}s)")

      train_set = fewshot.fewshot(splits.train, shots, seed)
      if "zero_shot" in args.variants:
        t = time.time()
        record("zero_shot", test_auc(text), t)
      t = time.time()
      train(text, args.stage1_steps or config.stage1.steps, dict(config.stage1.loss_weights), seed, train_set)
      if "text_only" in args.variants:
        record("text_only", test_auc(text), t)
      stage1 = jax.tree.map(np.array, nnx.state(model, nnx.Param))
      for variant in [v for v in args.variants if v.startswith("fused")]:
        nnx.update(model, stage1)
        t = time.time()
        weights = stage2_weights(config, variant)
        train(fused, args.stage2_steps or config.stage2.steps, weights, seed, train_set,
              views=weights.get("text_cl", 0) > 0)
        record(variant, test_auc(fused), t)
  return rows, {"test_size": len(test), "test_total": len(splits.test), "like_share_auc": 100 * like_share_auc(test),
                "fusion": dataclasses.asdict(fcfg) | {"item_corr": "itemcf_iuf(train pool)"},
                "stage1": config.stage1.to_dict(), "stage2": config.stage2.to_dict(),
                "optim": config.optim.to_dict(), "batch_size": config.train.batch_size,
                "train_on_inputs": d.train_on_inputs}


def markdown(rows, meta, args) -> str:
  full = (set(args.domains) == {"movie", "book"} and sorted(args.shots) == [16, 64, 256] and len(args.seeds) >= 3
          and all(m["test_size"] == m["test_total"] for m in meta.values()))
  lines = ["# Fused quality: TALLRec test AUC x100, SmolLM2-135M-Instruct int8", "",
           "**Full protocol.**" if full else
           "**A slice, not the full protocol** (2 domains x 16/64/256 shots x 3 seeds, whole test sets).", ""]
  for domain, m in meta.items():
    lines.append(f"- {domain}: test subset {m['test_size']} of {m['test_total']} (fewshot seed {args.test_seed}); "
                 f"stage 1 {args.stage1_steps or m['stage1']['steps']} steps, stage 2 "
                 f"{args.stage2_steps or m['stage2']['steps']} steps, batch {m['batch_size']}, lr {m['optim']['lr']}; "
                 f"like-share heuristic on the same subset {m['like_share_auc']:.2f}")
  lines += [f"- seeds {args.seeds}; fused variants start from the text-only (stage-1) weights, so they train "
            "stage 1 + stage 2 steps", "", "| domain | shots | variant | AUC x100 (mean) | seeds | TALLRec 7B | goal |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  for domain in args.domains:
    for shots in args.shots:
      for variant in args.variants:
        aucs = [r["auc"] for r in rows if (r["domain"], r["shots"], r["variant"]) == (domain, shots, variant)]
        if aucs:
          goal = GOALS[domain].get(shots, "") if variant == "fused" else ""
          lines.append(f"| {domain} | {shots} | {variant} | {np.mean(aucs):.2f} | {len(aucs)} | "
                       f"{PUBLISHED_TALLREC[domain].get(shots, '')} | {goal} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  split = lambda conv: lambda s: [conv(x) for x in s.split(",")]  # noqa: E731
  parser.add_argument("--domains", type=split(str), default=["movie", "book"])
  parser.add_argument("--shots", type=split(int), default=[16, 64, 256])
  parser.add_argument("--seeds", type=split(int), default=[0, 1, 2])
  parser.add_argument("--variants", type=split(str), default=list(VARIANTS))
  parser.add_argument("--test_size", type=int, default=0, help="deterministic test subsample; <= 0: all")
  parser.add_argument("--test_seed", type=int, default=0)
  parser.add_argument("--stage1_steps", type=int, default=0, help="0: the config's")
  parser.add_argument("--stage2_steps", type=int, default=0, help="0: the config's")
  parser.add_argument("--eval_batch_size", type=int, default=16)
  parser.add_argument("--out", default="benchmarks/results/fused_quality")
  args = parser.parse_args()
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  logfile = (out / "log.txt").open("w")

  def log(msg: str):
    print(msg, flush=True)
    logfile.write(msg + "\n")
    logfile.flush()

  rows, meta, t0 = [], {}, time.time()
  for domain in args.domains:
    domain_rows, meta[domain] = run_domain(domain, args, log)
    rows += domain_rows
  result = {"args": vars(args), "machine": f"{jax.devices()[0].platform}, {jax.device_count()} device(s)",
            "wall_s": time.time() - t0, "meta": meta, "rows": rows}
  (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / "results.md").write_text(markdown(rows, meta, args))
  print(markdown(rows, meta, args))


if __name__ == "__main__":
  main()
