"""Issue 5's table: TALLRec test AUC x100 for SmolLM2-135M-Instruct int8, zero-shot / text-only / fused.

Per domain: zero-shot, scored once (it depends on neither shots nor seed), and, when the config
pretrains the encoder on behaviour sequences (contrastive/feedback.py), that encoder alone (`encoder_only`,
no LLM). Per (domain, shots, seed): text-only LoRA (stage 1, TALLRec-style prompts); fused (stage 2 from
the stage-1 weights: soft tokens + the config's joint losses); fused with one part removed
(`fused-seq_cl`, `fused-text_cl`, `fused-pretrain`: encoder from scratch, `fused-hint`: no answer-hint
token, `fused-prompt_dropout`: no encoder dropout under the soft tokens in stage 2) or added (`fused+align_cl`,
`fused+sharp_hint`: the hint's P(like) from `common.SHARP_HINT_SCALE` (3) x the encoder's logit,
`fused+history_targets`: stage 2 also trains on 4 masked-item prompts per few-shot prompt, whose target
is one of its history items, `fused+hint_kd`: stage 2 also distils the encoder's P(like) into the answer,
`fused+hint_kd+align_cl`: both, `fused+align_cl-seq_cl` / `fused+align_cl-text_cl` and `fused+hint_kd-seq_cl` /
`fused+hint_kd-text_cl`: the movie and book soft-token recipes without seq_cl / text_cl);
the `FUSED` table below says what each changes. Residual fusion (`FusionConfig.mode='residual'`: the encoder's
like-logit + what LoRA changes in the LLM's Yes-minus-No logit) starts from the pretrained encoder with LoRA at
zero (no stage 1) and trains LoRA by `residual_answer` (`residual`: text-only prompts, `residual+gate`: learned
scalar weights on both parts, `residual+soft_tokens`: the prompt keeps the soft tokens and the projector trains,
`residual+text_cl` / `residual+align_cl`: the soft-token recipe's InfoNCE over text views / LLM-encoder alignment
kept beside the residual answer, the latter training `align_proj` too);
as the recipe does, each residual cell is validated (the config's `data.valid_size` subset) before its first step
and after its last (and every `train.eval_every` steps where > 0) and keeps the best, so it scores as its encoder
unless training raised the validation AUC (the row's `best_step`, `valid_auc`; with `--split valid` the rows are
then scored on prompts the step was chosen on, so they are optimistic). `--set fusion.residual_confirm_size=-1`
also asks the best step to beat the encoder on the whole validation split (paired interval above zero) to be kept
(the row's `confirm`).
Every variant is also paired with `encoder_only` (the same prompts scored by the encoder alone).
The full protocol is 2 domains x 16/64/256 shots x 3 seeds on the whole test sets; flags choose a slice,
and the output says which. `--split valid` scores the validation split instead (by default into
benchmarks/results/fused_quality_valid), so variants and step counts can be chosen without the test set.
`--merge` keeps the rows of OUT/results.json that this run does not recompute (and reuses its zero-shot
row for the same test subset); every row names its run.
benchmarks/quality.py reads OUT/results.json for its zero-shot, LoRA and fused rows.

  python benchmarks/fused_quality.py --domains movie --shots 64 --seeds 0 --test_size 128 \
      --stage1_steps 8 --stage2_steps 8 --variants zero_shot,text_only,fused --merge
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import tempfile
import argparse
import dataclasses
import json
import pathlib
import shlex
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.contrastive import feedback, fusion, recipe  # pylint: disable=wrong-import-position
from clclm_jax.data import fewshot  # pylint: disable=wrong-import-position
from clclm_jax.train import cli, evaluate  # pylint: disable=wrong-import-position
from configs import base, book_soft_tokens, movie_soft_tokens  # pylint: disable=wrong-import-position

# The fused variants are changes to the soft-token recipe; `residual` is configs/<domain>.py's fusion on the same
# encoder and shots (its guard and validation cadence through --set, as benchmarks/results/residual_confirm ran it).
CONFIGS = {"movie": movie_soft_tokens, "book": book_soft_tokens}

@dataclasses.dataclass(frozen=True)
class Ablation:
  """What a fused variant changes from plain fusion (`stage2_weights`): loss weights, FusionConfig fields,
  the encoder's pretraining, extra masked-item prompts per few-shot prompt."""

  loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)
  fusion: dict[str, Any] = dataclasses.field(default_factory=dict)
  scratch_encoder: bool = False
  history_targets: int = 0
  soft_tokens: bool = True  # the prompt holds the soft tokens (residual fusion may leave them out)

  @property
  def residual(self) -> bool:
    return self.fusion.get("mode") == "residual"


ALIGN_CL = {"align_cl": movie_soft_tokens.ALIGN_CL_WEIGHT}  # the movie recipe's alignment
HINT_KD = {"hint_kd": book_soft_tokens.HINT_KD_WEIGHT}  # the book recipe's distillation
RESIDUAL = {"mode": "residual"}
# Plain fusion's stage-2 weights (fused_lm, seq_cl and text_cl on; align_cl and hint_kd off), shared by both
# domains, so a variant's name means the same weights whatever the domain config turns on or off.
PLAIN = dict(movie_soft_tokens.fused_overrides(base.get_config()).stage2.loss_weights)
RESIDUAL_WEIGHTS = {"residual_answer": 1.0}  # residual fusion's only stage-2 loss (the encoder does not train)
FUSED = {
    "fused": Ablation(),
    "fused-seq_cl": Ablation(loss_weights={"seq_cl": 0.0}),
    "fused-text_cl": Ablation(loss_weights={"text_cl": 0.0}),
    "fused-pretrain": Ablation(scratch_encoder=True),
    "fused-hint": Ablation(fusion={"answer_hint": None}),
    "fused-prompt_dropout": Ablation(fusion={"prompt_dropout": False}),
    "fused+align_cl": Ablation(loss_weights=ALIGN_CL),
    "fused+sharp_hint": Ablation(fusion={"hint_scale": common.SHARP_HINT_SCALE}),
    "fused+history_targets": Ablation(history_targets=4),
    "fused+hint_kd": Ablation(loss_weights=HINT_KD),
    "fused+hint_kd+align_cl": Ablation(loss_weights=HINT_KD | ALIGN_CL),
    "fused+align_cl-seq_cl": Ablation(loss_weights=ALIGN_CL | {"seq_cl": 0.0}),
    "fused+align_cl-text_cl": Ablation(loss_weights=ALIGN_CL | {"text_cl": 0.0}),
    "fused+hint_kd-seq_cl": Ablation(loss_weights=HINT_KD | {"seq_cl": 0.0}),
    "fused+hint_kd-text_cl": Ablation(loss_weights=HINT_KD | {"text_cl": 0.0}),
    "residual": Ablation(fusion=RESIDUAL, soft_tokens=False),
    "residual+gate": Ablation(fusion=RESIDUAL | {"residual_gate": True}, soft_tokens=False),
    "residual+soft_tokens": Ablation(fusion=RESIDUAL),
    # the soft-token recipe's contrastive terms kept beside the residual answer (the encoder frozen, so no seq_cl)
    "residual+text_cl": Ablation(fusion=RESIDUAL, soft_tokens=False, loss_weights={"text_cl": PLAIN["text_cl"]}),
    "residual+align_cl": Ablation(fusion=RESIDUAL, soft_tokens=False, loss_weights=ALIGN_CL),
}


def stage2_weights(variant: str) -> dict[str, float]:
  """Stage-2 loss weights of a fused variant: plain fusion's, then the variant's changes; residual variants:
  `RESIDUAL_WEIGHTS`, then the variant's changes."""
  ablation = FUSED[variant]
  return (RESIDUAL_WEIGHTS if ablation.residual else PLAIN) | ablation.loss_weights


UNTRAINED = ("zero_shot", "encoder_only")  # scored once per domain: no shots, no seed
VARIANTS = UNTRAINED + ("text_only",) + tuple(FUSED)


def test_subset(splits, size: int, seed: int = 0, split: str = "test") -> list:
  """The prompts every cell is scored on (of `split`): `size` drawn by a seeded shuffle, or all when size <= 0."""
  return fewshot.fewshot(getattr(splits, split), size if size > 0 else None, seed)


def settings(r: dict) -> str:
  """The row's `--set` overrides as one canonical string ('{}' for the configs as written)."""
  return json.dumps(r.get("overrides", {}), sort_keys=True)


def row_key(r: dict) -> tuple:
  """Rows with equal keys measure the same thing; zero-shot has no shots, seed or steps."""
  return (r["domain"], r["variant"], r["shots"], r["seed"], r["test_size"], r["test_seed"], r["stage1_steps"],
          r["stage2_steps"], common.split_of(r), settings(r))


def steps_of(config, args) -> tuple[int, int]:
  """Stage step counts: the flags, or the config's where a flag is negative (0 skips stage 1)."""
  pick = lambda flag, steps: steps if flag < 0 else flag  # noqa: E731
  return pick(args.stage1_steps, config.stage1.steps), pick(args.stage2_steps, config.stage2.steps)


def run_domain(domain: str, args, log, previous: list[dict], run: int, meta: dict, emit) -> None:
  """Sets this domain's and test set's `meta` (what the rows are measured with), then emits the rows."""
  config = CONFIGS[domain].get_config()
  if args.config_seed is not None:  # the LoRA init and encoder-pretraining draws; the cell seed picks the shots
    config.seed = args.config_seed
  common.apply_overrides(config, args.overrides)
  s1, s2 = steps_of(config, args)
  t0 = time.time()
  r = recipe.build(config)
  model, splits, text, fused = r.model, r.splits, r.text, r.fused
  fcfg = model.config
  scratch = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  test = test_subset(splits, args.test_size, args.test_seed, args.split)
  total = len(getattr(splits, args.split))
  scratch_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"fused_quality_{domain}_"))
  encoder = recipe.pretrain_encoder(r, scratch_dir / "encoder")
  if encoder is not None:
    encoder["test_auc"] = feedback.encoder_auc(model, test)
    encoder["full_test_auc"] = feedback.encoder_auc(model, splits.test)  # no LLM: the whole test set is cheap
    log(f"{domain}: encoder pretrained for {encoder['steps']} steps in {encoder['seconds']:.0f}s; "
        f"valid AUC {100 * encoder['best_valid_auc']:.2f}, {args.split} subset AUC {100 * encoder['test_auc']:.2f}, "
        f"full test AUC {100 * encoder['full_test_auc']:.2f}")
  initial = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  base = {"domain": domain, "split": args.split, "test_size": len(test), "test_total": total,
          "test_seed": args.test_seed, "batch_size": config.train.batch_size, "lr": config.optim.lr, "run": run} \
      | ({"overrides": args.overrides} if args.overrides else {})
  meta[meta_key(domain, len(test), total, args.split)] = {
                  "split": args.split, "test_size": len(test), "test_total": total, "test_seed": args.test_seed,
                  "config_seed": config.seed,
                  "like_share_auc": 100 * evaluate.like_ratio_auc(test),
                  "fusion": dataclasses.asdict(fcfg) | {"item_corr": "itemcf_iuf(train pool)"},
                  "stage1_loss_weights": config.stage1.loss_weights.to_dict(),
                  "stage2_loss_weights": config.stage2.loss_weights.to_dict(), "optim": config.optim.to_dict(),
                  "batch_size": config.train.batch_size, "train_on_inputs": config.data.train_on_inputs,
                  "pad_multiple": config.data.pad_multiple,
                  "encoder_pretraining": None if encoder is None else {k: v for k, v in encoder.items()
                                                                        if k != "epochs"}}
  log(f"{domain}: loaded in {time.time() - t0:.0f}s; {args.split} {len(test)} of {total}; "
      f"like-share AUC {100 * evaluate.like_ratio_auc(test):.2f}")

  def test_auc(spec, what: str) -> tuple[float, float, str]:
    """(AUC x100, seconds, P(Yes) per prompt of `test` in its order, as one comma-separated line: model outputs,
    no labels). A residual model on text-only prompts reads their base logits, computed once per domain; one at
    its encoder is scored by the encoder alone (`Recipe.score`)."""
    t = time.time()
    scores = r.score(test, spec, desc=f"scoring {domain} {what}", batch_size=args.eval_batch_size,
                     name=f"scored {args.split}")
    p, label = scores.p_yes, scores.label
    return 100 * evaluate.auc(p, label), time.time() - t, ",".join(f"{x:.5f}" for x in p)

  def train(spec, steps, weights, seed, pool, trains=nnx.Param, validate=False) -> dict:
    return recipe.fit_stage(r, spec, pool, steps, weights, seed, pathlib.Path(tempfile.mkdtemp(dir=scratch_dir)),
                            trains, validate)

  def record(row):
    """Saves the row with the paired intervals updated, so a run stopped between cells keeps both."""
    mine.append(row)
    same_prompts = [x for x in merge_rows(previous, mine) if x["domain"] == domain and "p_yes" in x
                    and (x["test_size"], x["test_seed"], common.split_of(x), settings(x))
                    == (len(test), args.test_seed, args.split, settings(base))]
    labels = [x.label for x in test]
    meta[meta_key(domain, len(test), total, args.split)]["paired"] = (
        paired(same_prompts, labels, common.SOFT_TOKEN_RECIPES[domain]) + paired_with_encoder(same_prompts, labels))
    emit(row)
    log(f"{domain} {row['shots']}-shot seed {row['seed']} {row['variant']}: AUC {row['auc']:.2f} "
        f"(train {row['train_s']:.0f}s, score {row['score_s']:.0f}s)")

  mine: list[dict] = []
  if "zero_shot" in args.variants:
    zero = {**base, "variant": "zero_shot", "shots": 0, "seed": None, "stage1_steps": 0, "stage2_steps": 0}
    old = [r for r in previous if row_key(r) == row_key(zero)]
    if old:
      log(f"{domain} zero_shot: AUC {old[-1]['auc']:.2f}, kept from run {old[-1]['run']} (same {args.split} subset)")
    else:
      nnx.update(model, initial)
      auc, score_s, p_yes = test_auc(text, "zero_shot")
      record({**zero, "auc": auc, "train_s": 0.0, "score_s": score_s, "p_yes": p_yes})
  if "encoder_only" in args.variants and encoder is not None:
    p_yes = ",".join(f"{x:.5f}" for x in feedback.like_probabilities(model, test))
    record({**base, "variant": "encoder_only", "shots": 0, "seed": None, "stage1_steps": 0, "stage2_steps": 0,
            "auc": 100 * encoder["test_auc"], "train_s": encoder["seconds"], "score_s": 0.0, "p_yes": p_yes})
  if all(v in UNTRAINED for v in args.variants):
    return  # nothing to train: no shot or seed loop
  for shots in args.shots:
    for seed in args.seeds:
      nnx.update(model, initial)
      cell = {**base, "shots": shots, "seed": seed, "stage1_steps": s1}
      train_set = fewshot.fewshot(splits.train, shots, seed)
      if encoder is not None:  # how well the hint agrees with the labels the cell is taught on
        cell["pool_encoder_auc"] = 100 * feedback.encoder_auc(model, train_set)
      fused_variants = [v for v in args.variants if v in FUSED]
      needs_stage1 = "text_only" in args.variants or any(not FUSED[v].residual for v in fused_variants)
      train1_s = train(text, s1, dict(config.stage1.loss_weights), seed, train_set)["seconds"] if needs_stage1 else 0.0
      if "text_only" in args.variants and s1 > 0:
        auc, score_s, p_yes = test_auc(text, f"{shots}-shot seed {seed} text_only")
        record({**cell, "variant": "text_only", "stage2_steps": 0, "auc": auc, "train_s": train1_s,
                "score_s": score_s, "p_yes": p_yes})
      stage1 = jax.tree.map(np.array, nnx.state(model, nnx.Param))
      for variant in fused_variants:
        ablation = FUSED[variant]
        # residual fusion starts at its encoder: LoRA at zero (the weights before stage 1), no stage 1
        nnx.update(model, initial if ablation.residual else stage1)
        if ablation.scratch_encoder:
          nnx.update(model, nnx.State({k: scratch[k] for k in ("encoder", "feedback_head")}))
        model.configure(dataclasses.replace(fcfg, **ablation.fusion))
        weights = stage2_weights(variant)
        extra = config.stage2.history_targets or ablation.history_targets
        spec = fused if ablation.soft_tokens else text
        trains = fusion.residual_trains(ablation.soft_tokens, weights) if ablation.residual else nnx.Param
        # residual: validated before the first step and after the last (`train.eval_every` steps too, where > 0),
        # keeping the best, so a cell whose training lowers the validation AUC scores its encoder (step 0)
        fit = train(spec, s2, weights, seed, train_set + fewshot.history_targets(train_set, extra, seed), trains,
                    validate=ablation.residual)
        auc, score_s, p_yes = test_auc(spec, f"{shots}-shot seed {seed} {variant}")
        gates = model.residual_gates
        model.configure(fcfg)
        record({**cell, "variant": variant, "stage1_steps": 0 if ablation.residual else s1, "stage2_steps": s2,
                "loss_weights": weights, "history_targets": extra, "auc": auc,
                "train_s": (0.0 if ablation.residual else train1_s) + fit["seconds"], "score_s": score_s,
                "p_yes": p_yes}
               | ({} if gates is None else {"gates": [float(g) for g in np.asarray(gates[...])]})
               | ({"best_step": fit["best_step"], "valid_auc": 100 * fit["valid_auc"]} if ablation.residual else {})
               | ({"confirm": fit["confirm"]} if "confirm" in fit else {}))


def paired(rows: list[dict], labels: list[int], reference: str, resamples: int = 1000) -> list[dict]:
  """`reference` against every other variant of the same cell (shots, steps) scored on the same prompts:
  `evaluate.paired_bootstrap` over the prompts, AUCs averaged over the seeds both have (the same draws)."""
  out = []
  cells = common.group_by([x for x in rows if x["variant"] not in UNTRAINED],
                          lambda x: (x["shots"], x["stage1_steps"], x["stage2_steps"]))
  for (shots, s1, s2), rs in sorted(cells.items()):
    p_yes = lambda v: {x["seed"]: np.array(x["p_yes"].split(","), float) for x in rs if x["variant"] == v}  # noqa: E731
    ref = p_yes(reference)
    for variant in sorted({x["variant"] for x in rs} - {reference}, key=VARIANTS.index):
      other = p_yes(variant)
      seeds = sorted(set(ref) & set(other))
      if seeds:
        c = evaluate.paired_bootstrap([ref[k] for k in seeds], [other[k] for k in seeds], labels,
                                      resamples=resamples)
        out.append({"shots": shots, "steps": f"{s1}+{s2}", "a": reference, "b": variant, "seeds": seeds,
                    **{k: c[k] for k in ("n", "auc_a", "auc_b", "difference", "ci95", "share_a_not_better")}})
  return out


def paired_with_encoder(rows: list[dict], labels: list[int], resamples: int = 1000) -> list[dict]:
  """Every trained variant against `encoder_only` on the same prompts (A - B = variant - encoder alone): the
  encoder's P(like) is the same for every seed, so it is paired with each seed's scores on the same draws."""
  enc = [x for x in rows if x["variant"] == "encoder_only"]
  if not enc:
    return []
  p_enc = np.array(enc[-1]["p_yes"].split(","), float)
  out = []
  cells = common.group_by([x for x in rows if x["variant"] not in UNTRAINED],
                          lambda x: (x["shots"], x["stage1_steps"], x["stage2_steps"], x["variant"]))
  for (shots, s1, s2, variant), rs in sorted(cells.items(), key=lambda kv: (kv[0][:3], VARIANTS.index(kv[0][3]))):
    by_seed = {x["seed"]: np.array(x["p_yes"].split(","), float) for x in rs}
    seeds = sorted(by_seed)
    c = evaluate.paired_bootstrap([by_seed[k] for k in seeds], [p_enc] * len(seeds), labels, resamples=resamples)
    out.append({"shots": shots, "steps": f"{s1}+{s2}", "a": variant, "b": "encoder_only", "seeds": seeds,
                **{k: c[k] for k in ("n", "auc_a", "auc_b", "difference", "ci95", "share_a_not_better")}})
  return out


def merge_rows(previous: list[dict], new: list[dict]) -> list[dict]:
  """`previous` rows that `new` does not measure again, then `new`."""
  keys = {row_key(r) for r in new}
  return [r for r in previous if row_key(r) not in keys] + new


def command(argv: list[str]) -> str:
  return "python benchmarks/fused_quality.py " + shlex.join(argv)


def meta_key(domain: str, test_size: int, test_total: int, split: str = "test") -> str:
  """Subset and whole-set runs of a domain and split keep separate metadata (their like-share AUCs differ)."""
  key = domain if split == "test" else f"{domain}, {split}"
  return key if test_size < test_total else f"{key}, whole {split} set"


def markdown(result: dict) -> str:
  rows, runs = result["rows"], result["runs"]
  domains = sorted({r["domain"] for r in rows}, key=["movie", "book"].index)
  trained = [r for r in rows if r["variant"] not in UNTRAINED]
  splits = sorted({common.split_of(r) for r in rows})  # "test" sorts before "valid"
  full = (set(domains) == {"movie", "book"} and {r["shots"] for r in trained} >= {16, 64, 256}
          and len({r["seed"] for r in trained}) >= 3 and all(r["test_size"] == r["test_total"] for r in rows)
          and splits == ["test"])
  lines = [f"# Fused quality: TALLRec {' and '.join(splits) or 'test'} AUC x100, SmolLM2-135M-Instruct int8", "",
           f"Machine: {common.machine_line(result['machine'])}.", "",
           "**Full protocol.**" if full else
           "**A slice, not the full protocol** (2 domains x 16/64/256 shots x 3 seeds, whole test sets).", ""]
  for key, m in result["meta"].items():
    split = common.split_of(m)
    subset = (f"{split} subset {m['test_size']} of {m['test_total']} (fewshot seed {m['test_seed']})"
              if m["test_size"] < m["test_total"] else f"all {m['test_total']} {split} prompts")
    lines.append(f"- {key}: {subset}; batch {m['batch_size']}, lr {m['optim']['lr']}, answer-only LM loss; "
                 f"like-share heuristic on the same prompts {m['like_share_auc']:.2f}")
    enc = m.get("encoder_pretraining") or {}
    if "full_test_auc" in enc:
      lines.append(f"  - pretrained encoder alone (no LLM): valid {100 * enc['best_valid_auc']:.2f}, "
                   f"whole test set {100 * enc['full_test_auc']:.2f}"
                   + ("; its pretraining keeps the epoch best on valid, so its valid rows are optimistic"
                      if split == "valid" else ""))
  lines += ["- steps `s1+s2`: stage-1 (text-only LoRA) steps + stage-2 (fused) steps; fused variants start from "
            "the text-only weights of the same cell; examples seen = steps x batch (so 256 shots with 8 steps "
            "sees 64 of them); minutes are wall clock on the shared machine, XLA compiles included",
            "- runs (the `run` column):"]
  lines += [f"  {i}. `{run['command']}` ({run['wall_s'] / 60:.1f} min, load {run['loadavg_before'][0]:.1f})"
            + (f", {common.stopped_note(run['stopped'])}" if "stopped" in run else "") for i, run in enumerate(runs)]
  lines += ["- `pool enc.`: the pretrained encoder's AUC on the cell's few-shot training prompts (how far the hint "
            "agrees with the labels stage 2 learns from), mean over seeds", "",
            "| domain | test | shots | variant | steps | AUC x100 | seeds | pool enc. | train + score min per seed | "
            "run | TALLRec 7B | goal |", "|" + " --- |" * 12]
  groups = common.group_by(rows, lambda r: (r["domain"], r["shots"], r["variant"], r["stage1_steps"],
                                            r["stage2_steps"], r["test_size"], common.split_of(r), settings(r)))
  order = lambda k: (domains.index(k[0]), k[6] != "test", k[1], VARIANTS.index(k[2]), k[3], k[4], k[5], k[7])  # noqa: E731
  for key in sorted(groups, key=order):
    rs = groups[key]
    aucs = [r["auc"] for r in rs]
    domain, shots, variant = key[:3]
    minutes = statistics.mean(r["train_s"] + r["score_s"] for r in rs) / 60
    on_test = key[6] == "test"  # the published numbers and goals are test-set numbers
    goal = common.FUSED_GOALS[domain].get(shots, "") if variant == "fused" and on_test else ""
    pool = [r["pool_encoder_auc"] for r in rs if "pool_encoder_auc" in r]
    pool = f"{statistics.mean(pool):.1f}" if len(pool) == len(rs) else ""
    test = "all" if rs[0]["test_size"] == rs[0]["test_total"] else f"{rs[0]['test_size']}/{rs[0]['test_total']}"
    test = test if on_test else f"{key[6]} {test}"
    shown = variant + ("" if key[7] == "{}" else " " + ", ".join(f"{k}={v}" for k, v in json.loads(key[7]).items()))
    lines.append(f"| {domain} | {test} | {shots or '-'} | {shown} | {key[3]}+{key[4]} | "
                 f"{common.mean_std(aucs)} | "
                 f"{','.join(str(r['seed']) for r in rs if r['seed'] is not None) or '-'} | {pool} | {minutes:.1f} | "
                 f"{','.join(sorted({str(r['run']) for r in rs}))} | "
                 f"{common.TALLREC_PUBLISHED[domain].get(shots, '') if on_test else ''} | "
                 f"{goal} |")
  for key, m in result["meta"].items():
    if m.get("paired"):
      lines += ["", f"Paired comparisons, {key} (bootstrap over the same prompts, 1000 draws shared by both variants "
                "and all their seeds; AUC x100 averaged over the seeds):", "",
                "| shots | steps | A | B | seeds | AUC A | AUC B | A - B | 95% interval | draws with A not better |",
                "|" + " --- |" * 10]
      lines += [f"| {c['shots']} | {c['steps']} | {c['a']} | {c['b']} | {','.join(map(str, c['seeds']))} | "
                f"{100 * c['auc_a']:.2f} | {100 * c['auc_b']:.2f} | {100 * c['difference']:+.2f} | "
                f"{100 * c['ci95'][0]:+.2f} .. {100 * c['ci95'][1]:+.2f} | {100 * c['share_a_not_better']:.1f}% |"
                for c in m["paired"]]
      lines.append("")
  return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  split = lambda conv: lambda s: [conv(x) for x in s.split(",")]  # noqa: E731
  parser.add_argument("--domains", type=split(str), default=["movie", "book"])
  parser.add_argument("--shots", type=split(int), default=[16, 64, 256])
  parser.add_argument("--seeds", type=split(int), default=[0, 1, 2])
  parser.add_argument("--variants", type=split(str), default=list(VARIANTS))
  parser.add_argument("--split", choices=("test", "valid"), default="test",
                      help="score on the test set, or on the validation split (to choose variants without test)")
  parser.add_argument("--test_size", type=int, default=0, help="deterministic subsample of --split; <= 0: all")
  parser.add_argument("--test_seed", type=int, default=0)
  parser.add_argument("--stage1_steps", type=int, default=-1,
                      help="< 0: the config's; 0: no stage 1 (fused variants start from the zero-shot LLM)")
  parser.add_argument("--stage2_steps", type=int, default=-1, help="< 0: the config's")
  parser.add_argument("--eval_batch_size", type=int, default=16)
  parser.add_argument("--config_seed", type=int, default=None,
                      help="config.seed (LoRA init, encoder pretraining); default: the config's. Use a separate --out")
  parser.add_argument("--out", default=None, help="default benchmarks/results/fused_quality, + `_valid` for valid")
  parser.add_argument("--merge", action="store_true", help="keep OUT/results.json rows this run does not redo")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every domain, e.g. optim.lr=3e-4 or train.eval_every=8 "
                           "(repeatable); the rows carry them; use a separate --out (the paired tables are per domain)")
  args = parser.parse_args(argv)
  args.overrides = common.parse_overrides(args.overrides)
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
  return args


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  cache = cli.enable_compilation_cache()
  out = pathlib.Path(args.out or "benchmarks/results/fused_quality" + ("" if args.split == "test" else "_valid"))
  out.mkdir(parents=True, exist_ok=True)
  previous = json.loads((out / "results.json").read_text()) if args.merge and (out / "results.json").exists() \
      else {"runs": [], "meta": {}, "rows": []}
  run = len(previous["runs"])
  logfile = (out / "log.txt").open("a" if args.merge else "w")

  def log(msg: str):
    print(msg, flush=True)
    logfile.write(msg + "\n")
    logfile.flush()

  argv = sys.argv[1:] if argv is None else argv
  log(f"run {run}: {command(argv)} (XLA cache {cache})")
  rows, meta, t0, load = [], dict(previous["meta"]), time.time(), common.loadavg()

  def save(stopped: str | None = None) -> dict:
    runs = previous["runs"] + [{"command": command(argv), "cpu": common.cpu_model(), "wall_s": time.time() - t0,
                                "loadavg_before": load, "loadavg_after": common.loadavg()}
                               | ({"stopped": stopped} if stopped else {})]
    result = {"machine": common.machine(), "runs": runs, "meta": meta, "rows": merge_rows(previous["rows"], rows)}
    common.write_result(out, "results", result, markdown(result), echo=False)
    return result

  def emit(row: dict):
    rows.append(row)
    save()

  try:
    for domain in args.domains:
      run_domain(domain, args, log, previous["rows"], run, meta, emit)
  except BaseException as e:  # the rows measured so far stay, and the run says why it has no more
    why = (str(e).splitlines() or [""])[0]
    stopped = f"{type(e).__name__}: {why}"[:200] if why else type(e).__name__
    log(f"run {run} stopped: {stopped}")
    save(stopped)
    raise
  result = save()
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()
