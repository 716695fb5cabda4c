"""CLCLMRec from one config: encoder pretraining, stage 1 (text-only LoRA), stage 2 (fused soft tokens), AUC.

`train.py` and `eval.py` run `train` and `evaluate_split` for configs with a `fusion` block
(configs/fused_movie.py, fused_book.py); `benchmarks/fused_quality.py` runs the same pieces per few-shot
cell and ablation.
"""

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.contrastive import feedback, fusion, joint
from clclm_jax.contrastive.fusion import FusedRec, FusionConfig
from clclm_jax.data import augment, fewshot, tallrec, tokenize
from clclm_jax.data.records import Interaction
from clclm_jax.train import checkpoint, curves, evaluate, loop, predictions, runconfig, state as state_lib
from clclm_jax.train.errors import ConfigError


@dataclasses.dataclass
class Recipe:
  """What every stage of a run shares: the fused model, its tokenizer, the data and both prompt layouts."""

  config: ConfigDict
  model: FusedRec
  tokenizer: Any
  splits: tallrec.TallrecSplits
  text: joint.PromptSpec  # TALLRec prompts (stage 1, text-only scoring)
  fused: joint.PromptSpec  # the same prompts with k soft-token placeholders (stage 2)

  @property
  def yes_no(self) -> tuple[int, int]:
    return tokenize.answer_token_ids(self.tokenizer, self.config.data.template)

  def eval_batches(self, xs: Sequence[Interaction], spec: joint.PromptSpec, batch_size: int | None = None):
    return joint.eval_batches(xs, self.splits.catalogue, self.tokenizer, spec,
                              batch_size=batch_size or self.config.train.eval_batch_size,
                              pad_multiple=self.config.data.pad_multiple, max_widths=self.config.data.eval_widths)


def build(config: ConfigDict) -> Recipe:
  """Loads the LLM (`loop.build_model`: int8 base + LoRA), the TALLRec splits (`loop.rec_splits`) and a fresh
  encoder/projector per `config.fusion`."""
  f, d = config.fusion, config.data
  llm, tokenizer = loop.build_model(config)
  splits = loop.rec_splits(config)
  num_items = splits.catalogue.max_id
  corr = augment.itemcf_iuf([np.asarray(x.history_ids) for x in splits.train], num_items, f.corr_top_k)
  placeholder_id = tokenizer.convert_tokens_to_ids(f.placeholder)
  fcfg = FusionConfig(num_items=num_items, placeholder_id=placeholder_id, num_soft_tokens=f.num_soft_tokens,
                      source=f.source, projector_hidden=f.projector_hidden, encoder_hidden=f.encoder_hidden,
                      encoder_layers=f.encoder_layers, encoder_heads=f.encoder_heads,
                      encoder_dropout=f.encoder_dropout, max_len=f.history_len + 1, pooling=f.pooling,
                      seq_temperature=f.seq_temperature, text_temperature=f.text_temperature,
                      align_temperature=f.align_temperature, target_aware=f.target_aware,
                      prompt_dropout=f.prompt_dropout, hint_scale=f.hint_scale,
                      answer_hint=tokenize.answer_token_ids(tokenizer, d.template) if f.answer_hint else None)
  if f.item_init not in ("", "titles"):
    raise ConfigError(f"config.fusion.item_init={f.item_init!r}: use '' (learned item ids) or 'titles'")
  item_init = fusion.item_text_table(llm, tokenizer, splits.catalogue, d.domain) if f.item_init else None
  model = FusedRec(llm, fcfg, item_corr=corr, item_init=item_init, rngs=nnx.Rngs(config.seed))
  text = joint.PromptSpec(d.domain, f.placeholder, placeholder_id, 0, cutoff_len=d.cutoff_len,
                          train_on_inputs=d.train_on_inputs, template=d.template, history_len=f.history_len,
                          view_len=f.view_len)
  return Recipe(config, model, tokenizer, splits, text, text.with_soft_tokens(f.num_soft_tokens))


def pretrain_encoder(r: Recipe, log: Callable[[str], None] = print) -> dict | None:
  """Next-feedback + InfoNCE pretraining of the target-aware encoder (`config.fusion.pretrain`); None if off."""
  f = r.config.fusion
  if not (f.target_aware and f.pretrain.epochs > 0):
    return None
  pcfg = feedback.PretrainConfig(**f.pretrain.to_dict(), window=f.history_len + 1, seed=r.config.seed)
  seqs = feedback.behaviour_sequences(r.config.data.domain, r.splits,
                                     timelines=not loop.uses_files(r.config))
  return feedback.pretrain(r.model, seqs, r.splits.valid, pcfg, log) | {"config": dataclasses.asdict(pcfg)}


def fit_stage(r: Recipe, spec: joint.PromptSpec, pool: Sequence[Interaction], steps: int,
              loss_weights: Mapping[str, float], seed: int, log: Callable[[int, dict], None] | None = None) -> float:
  """`steps` joint updates on `pool` with `spec`'s prompts (text views only when `text_cl` is on); seconds."""
  t0 = time.time()
  views = loss_weights.get("text_cl", 0) > 0
  batches = joint.train_batches(pool, r.splits.catalogue, r.tokenizer, spec, batch_size=r.config.train.batch_size,
                                seed=seed, views=views, pad_multiple=r.config.data.pad_multiple)
  joint.fit(r.model, batches, steps=steps, loss_weights=loss_weights, optim=r.config.optim, seed=seed, log=log)
  return time.time() - t0


def score_split(r: Recipe, split: str, workdir: pathlib.Path | None = None) -> dict:
  """AUC of the fused model on the prompts `split` scores (`loop.eval_positions`) and the like-ratio reference
  on them; with `workdir`, also WORKDIR/eval/<split>_predictions.jsonl."""
  positions = loop.eval_positions(r.config, r.splits, split)
  xs = [getattr(r.splits, split)[i] for i in positions]
  p, label = joint.score(r.model, r.eval_batches(xs, r.fused), *r.yes_no, desc=split)
  if workdir is not None and jax.process_index() == 0:
    predictions.write(workdir, split, positions, label, p)
  return {"auc": evaluate.auc(p, label), "n": len(xs), "like_ratio_auc": evaluate.like_ratio_auc(xs)}


def _bar_log(bar: tqdm.tqdm, rows: list[dict], stage: str) -> Callable[[int, dict], None]:
  """Shows the losses on `bar` and appends a metrics.jsonl row per step (steps count on across stages)."""
  def log(_, metrics: dict) -> None:
    bar.set_postfix({k.removeprefix("loss/"): f"{v:.4f}" for k, v in metrics.items() if k.startswith("loss")})
    bar.update(1)
    rows.append({"step": len(rows) + 1, "stage": stage, **{f"train/{k}": v for k, v in metrics.items()}})
  return log


def _write_metrics(workdir: pathlib.Path, rows: list[dict], title: str, valid_reference: float) -> None:
  """WORKDIR/metrics.jsonl (written whole, after each stage and at the end) and curves.png."""
  path = checkpoint.write_text(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  curves.write_curves(path, workdir / "curves.png", title=title, valid_reference=valid_reference)


STAGES = ("encoder pretraining", "stage 1", "stage 2")  # the resume points of `train`, numbered from 1


def run_stages(r: Recipe, ckpts: checkpoint.Checkpoints, pool: Sequence[Interaction],
               after_stage: Callable[[list[dict]], None], log: Callable[[str], None] = print
               ) -> tuple[list[dict], dict | None]:
  """Encoder pretraining, stage 1 (text) and stage 2 (fused), saving the params after each; the stages that
  `ckpts` shows finished are restored, not rerun. Returns the metrics rows and the pretraining result."""
  done, rows, encoder = 0, [], None
  resumed = ckpts.restore_stage(state_lib.split_model(r.model)[1])
  if resumed is not None:
    done, params, meta = resumed
    nnx.update(r.model, params)
    rows, encoder = meta["rows"], meta["encoder"]
    log(f"resuming {ckpts.root.parent} after {STAGES[done - 1]}")
  if done < 1:
    encoder = pretrain_encoder(r, log)
    ckpts.save_stage(1, state_lib.split_model(r.model)[1], {"rows": rows, "encoder": encoder})
  c = r.config
  for k, (name, spec, stage) in enumerate([("stage1", r.text, c.stage1), ("stage2", r.fused, c.stage2)], start=2):
    if done >= k:
      continue
    with tqdm.tqdm(total=stage.steps, desc=name) as bar:
      fit_stage(r, spec, pool + fewshot.history_targets(pool, stage.history_targets, c.seed), stage.steps,
                dict(stage.loss_weights), c.seed, _bar_log(bar, rows, name))
    ckpts.save_stage(k, state_lib.split_model(r.model)[1], {"rows": rows, "encoder": encoder})
    after_stage(rows)
  return rows, encoder


def train(config: ConfigDict, workdir: str | pathlib.Path, log: Callable[[str], None] = print) -> dict:
  """Pretrain, stage 1, stage 2 on `data.shots` examples; saves the params as the best checkpoint in
  `workdir`, scores valid (and test unless `data.test_size == 0`); returns and writes the summary.
  Run the same command again after a kill and it goes on after the last finished stage (`run_stages`)."""
  workdir, t0, d = pathlib.Path(workdir), time.time(), config.data
  workdir.mkdir(parents=True, exist_ok=True)
  if (workdir / "checkpoints" / "stages").is_dir():  # a run to go on with: its config must match
    runconfig.check_resume(config, workdir)
  if jax.process_index() == 0:
    runconfig.save(config, workdir)
  r = build(config)
  pool = loop.train_interactions(config, r.splits)
  valid_reference = evaluate.like_ratio_auc(loop.eval_interactions(config, r.splits, "valid"))
  s1, steps = config.stage1.steps, config.stage1.steps + config.stage2.steps
  title = f"{config.name}: stage 1 (text) steps 1-{s1}, stage 2 (fused) {s1 + 1}-{steps}"

  def write_metrics(rows: list[dict]) -> None:
    if jax.process_index() == 0 and rows:
      _write_metrics(workdir, rows, title, valid_reference)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    rows, encoder = run_stages(r, ckpts, pool, write_metrics, log)
    valid = score_split(r, "valid")
    summary = {"stage": "fused", "steps": steps, "best_step": steps, "shots": len(pool),
               "encoder_valid_auc": None if encoder is None else encoder["best_valid_auc"],
               "valid_auc": valid["auc"], "valid_like_ratio_auc": valid["like_ratio_auc"]}
    ckpts.save_best(steps, state_lib.split_model(r.model)[1], {"step": steps, "valid": {"auc": summary["valid_auc"]}})
  finally:
    ckpts.close()
  if d.test_size != 0:
    test = score_split(r, "test", workdir)
    summary.update(test_auc=test["auc"], test_like_ratio_auc=test["like_ratio_auc"])
  summary["wall_s"] = time.time() - t0
  if jax.process_index() == 0:
    checkpoint.write_text(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if rows:
      rows[-1]["valid/auc"] = summary["valid_auc"]
      write_metrics(rows)
  return summary


def evaluate_split(config: ConfigDict, workdir: str | pathlib.Path, split: str = "test") -> dict:
  """AUC of the saved fused model on `split` (its configured subset); writes WORKDIR/eval/<split>_metrics.json
  and <split>_predictions.jsonl."""
  workdir, t0 = pathlib.Path(workdir), time.time()
  runconfig.check_model(config, workdir)
  r = build(config)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    params, meta = ckpts.restore_best(state_lib.split_model(r.model)[1])
  finally:
    ckpts.close()
  nnx.update(r.model, params)
  metrics = {**score_split(r, split, workdir), "best_step": meta["step"], "wall_s": time.time() - t0}
  if jax.process_index() == 0:
    predictions.write_metrics(workdir, split, metrics)
  return metrics
