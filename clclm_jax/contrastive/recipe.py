"""CLCLMRec from one config as a stage list of the one trainer: encoder pretraining, stage 1 (text-only
LoRA), stage 2 (fused soft tokens, or residual fusion with no stage 1), then AUC.

`train.py` and `eval.py` run `train` and `evaluate_split` for configs with a `fusion` block
(configs/movie.py, book.py: residual; movie_soft_tokens.py, book_soft_tokens.py); `benchmarks/fused_quality.py`
runs the same stages per few-shot cell and ablation.
"""

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.contrastive import feedback, fusion, losses  # noqa: F401 (losses: registers the joint losses)
from clclm_jax.contrastive.fusion import FusedRec, FusionConfig
from clclm_jax.data import augment, configured, fewshot, tallrec, tokenize
from clclm_jax.data import fused as fused_data
from clclm_jax.data.records import Interaction
from clclm_jax.model import build as model_build
from clclm_jax.train import checkpoint, evaluate, predictions, runconfig, sharding, trainer
from clclm_jax.train.errors import ConfigError


@dataclasses.dataclass
class Recipe:
  """What every stage of a run shares: the fused model, its tokenizer, the data, both prompt layouts, the mesh
  and the one scorer."""

  config: ConfigDict
  model: FusedRec
  tokenizer: Any
  splits: tallrec.TallrecSplits
  text: fused_data.PromptSpec  # TALLRec prompts (stage 1, text-only scoring)
  fused: fused_data.PromptSpec  # the same prompts with k soft-token placeholders (stage 2)
  mesh: Any
  scorer: evaluate.Scorer
  # The name of a prompt set (train pool, "valid", a split) -> (its interactions, their base logits): each set
  # runs its base pass once per run, however often it is trained on or scored (`base_logits`).
  base_cache: dict = dataclasses.field(default_factory=dict)

  @property
  def answer_spec(self) -> fused_data.PromptSpec:
    """The prompts stage 2 trains and the run scores: fused, or text-only for residual fusion without soft tokens."""
    f = self.config.fusion
    return self.text if f.mode == "residual" and not f.residual_soft_tokens else self.fused

  @property
  def stage2_trains(self):
    """What stage 2 trains: every parameter, or for residual fusion `fusion.residual_trains`."""
    f = self.config.fusion
    weights = self.config.stage2.loss_weights
    return fusion.residual_trains(f.residual_soft_tokens, weights) if f.mode == "residual" else nnx.Param

  @property
  def yes_no(self) -> tuple[int, int]:
    return tokenize.answer_token_ids(self.tokenizer, self.config.data.template)

  def cached_base(self, spec: fused_data.PromptSpec) -> bool:
    """Whether batches of `spec`'s prompts carry their base logits: a residual model (as configured now) on
    text-only prompts, whose LoRA-off pass nothing trained changes. With soft tokens the projector trains and
    the base pass is recomputed at every step."""
    return self.model.residual and not spec.num_soft_tokens

  def base_logits(self, xs: Sequence[Interaction], name: str = "prompts") -> np.ndarray:
    """The frozen base's Yes-minus-No logit (LoRA off) of each text-only prompt of `xs`, computed once per set.
    The cache is keyed by the set's `name`; an entry is used only for the same interactions (the tuple comparison
    checks each element's identity first: a set rebuilt from the same records costs a pointer compare per prompt,
    not a hash of every field as a tuple key did), and another set under that name replaces it."""
    xs = tuple(xs)
    cached = self.base_cache.get(name)
    if cached is None or cached[0] != xs:
      batches = self._eval_batches(xs, self.text, None, None)
      cached = self.base_cache[name] = (xs, self.scorer.base_logits(self.model, batches,
                                                                     desc=f"base logits of {len(xs)} prompts"))
    return cached[1]

  def eval_batches(self, xs: Sequence[Interaction], spec: fused_data.PromptSpec, batch_size: int | None = None,
                   name: str = "prompts"):
    """Scoring batches of `xs` with `spec`'s prompts, with their base logits (the set `name`) where `cached_base`."""
    return self._eval_batches(xs, spec, batch_size, self.base_logits(xs, name) if self.cached_base(spec) else None)

  def _eval_batches(self, xs, spec, batch_size, base_logits):
    return fused_data.eval_batches(xs, self.splits.catalogue, self.tokenizer, spec,
                              batch_size=(batch_size or self.config.train.eval_batch_size) // jax.process_count(),
                              pad_multiple=self.config.data.pad_multiple, max_widths=self.config.data.eval_widths,
                              base_logits=base_logits)

  def score(self, xs: Sequence[Interaction], spec: fused_data.PromptSpec, desc: str | None = None,
            batch_size: int | None = None, name: str | None = None) -> evaluate.Scores:
    """P(Yes) of the model as it is now for the prompts `xs` (ordered as `xs`), with `spec`'s layout (`name`: the
    prompt set whose base logits are cached, default `desc`). A residual model at its encoder
    (`fusion.at_its_encoder`: no trained step kept) is scored by the encoder alone: the LLM passes would add zero."""
    if fusion.at_its_encoder(self.model):
      return evaluate.Scores(feedback.like_probabilities(self.model, xs), np.asarray([x.label for x in xs]),
                             np.arange(len(xs)))
    desc = desc or "eval"
    return self.scorer(self.model, self.eval_batches(xs, spec, batch_size, name or desc), desc=desc)


def build(config: ConfigDict) -> Recipe:
  """Loads the LLM (`model_build.build_model`: int8 base + LoRA), the TALLRec splits (`configured.rec_splits`) and a fresh
  encoder/projector per `config.fusion`, placed on the mesh of `config.mesh` with the run's scorer."""
  f, d = config.fusion, config.data
  sharding.maybe_initialize_distributed(config)
  mesh = sharding.make_mesh(config.mesh)
  llm, tokenizer = model_build.build_model(config)
  splits = configured.rec_splits(config)
  num_items = splits.catalogue.max_id
  corr = augment.itemcf_iuf([np.asarray(x.history_ids) for x in splits.train], num_items, f.corr_top_k)
  placeholder_id = tokenizer.convert_tokens_to_ids(f.placeholder)
  fcfg = FusionConfig(num_items=num_items, placeholder_id=placeholder_id, num_soft_tokens=f.num_soft_tokens,
                      source=f.source, projector_hidden=f.projector_hidden, encoder_hidden=f.encoder_hidden,
                      encoder_layers=f.encoder_layers, encoder_heads=f.encoder_heads,
                      encoder_dropout=f.encoder_dropout, max_len=f.history_len + 1, pooling=f.pooling,
                      seq_temperature=f.seq_temperature, text_temperature=f.text_temperature,
                      align_temperature=f.align_temperature, target_aware=f.target_aware,
                      prompt_dropout=f.prompt_dropout, hint_scale=f.hint_scale, mode=f.mode,
                      residual_gate=f.residual_gate, yes_no=tokenize.answer_token_ids(tokenizer, d.template),
                      answer_hint=tokenize.answer_token_ids(tokenizer, d.template) if f.answer_hint else None)
  if f.item_init not in ("", "titles"):
    raise ConfigError(f"config.fusion.item_init={f.item_init!r}: use '' (learned item ids) or 'titles'")
  item_init = fusion.item_text_table(llm, tokenizer, splits.catalogue, d.domain) if f.item_init else None
  model = FusedRec(llm, fcfg, item_corr=corr, item_init=item_init, rngs=nnx.Rngs(config.seed))
  text = fused_data.PromptSpec(d.domain, f.placeholder, placeholder_id, 0, cutoff_len=d.cutoff_len,
                          train_on_inputs=d.train_on_inputs, template=d.template, history_len=f.history_len,
                          view_len=f.view_len, context=llm.config.max_position_embeddings)
  trainer.place(model, mesh)
  scorer = evaluate.make_scorer(model, mesh, *tokenize.answer_token_ids(tokenizer, d.template),
                                stop_token=placeholder_id)
  return Recipe(config, model, tokenizer, splits, text, text.with_soft_tokens(f.num_soft_tokens), mesh, scorer)


def encoder_stage(r: Recipe, workdir: pathlib.Path) -> trainer.Stage | None:
  """Next-feedback + InfoNCE pretraining of the target-aware encoder (`config.fusion.pretrain`); None if off."""
  f = r.config.fusion
  if not (f.target_aware and f.pretrain.epochs > 0):
    return None
  pcfg = feedback.PretrainConfig(**f.pretrain.to_dict(), window=f.history_len + 1, seed=r.config.seed)
  seqs = feedback.behaviour_sequences(r.config.data.domain, r.splits, timelines=not configured.uses_files(r.config))
  return feedback.pretrain_stage(r.model, seqs, r.splits.valid, pcfg, workdir, r.config)


def rec_stage(r: Recipe, name: str, spec: fused_data.PromptSpec, pool: Sequence[Interaction], steps: int,
              loss_weights: Mapping[str, float], workdir: pathlib.Path, *, trains=nnx.Param, seed: int | None = None,
              validate: bool = True) -> trainer.Stage:
  """`steps` updates on `pool` with `spec`'s prompts (text views only when `text_cl` is on), validated
  on the `data.valid_size` subset with the same prompts (every `train.eval_every` steps, else at the end). A
  residual model (`r.model.residual`) is validated before its first step too, so its encoder (step 0) stays the
  result unless a step beats it; on text-only prompts its batches carry their base logits (`Recipe.base_logits`,
  computed when the stage first asks for batches, so a finished stage computes none)."""
  c = r.config
  seed = c.seed if seed is None else seed
  views = loss_weights.get("text_cl", 0) > 0
  cached = r.cached_base(spec)
  batches = lambda: fused_data.train_batches(  # noqa: E731
      pool, r.splits.catalogue, r.tokenizer, spec, batch_size=c.train.batch_size, seed=seed, views=views,
      pad_multiple=c.data.pad_multiple, base_logits=r.base_logits(pool, f"train {name}") if cached else None)
  valid_xs = configured.eval_interactions(c, r.splits, "valid")
  check = lambda model: r.scorer(  # noqa: E731
      model, r.eval_batches(valid_xs, spec, name="valid"), desc="valid").metrics()
  return trainer.Stage(
      name, workdir, batches, dict(loss_weights), steps, c.optim, c.train.batch_size,
      min(c.train.micro_batch_size, c.train.batch_size), trains=trains, validate=check if validate else None,
      eval_every=c.train.eval_every, patience=c.train.patience, checkpoint_every=c.train.checkpoint_every,
      validate_at_start=validate and r.model.residual, confirm=residual_confirm(r) if validate else None,
      seed=seed, config=c,
      valid_reference=evaluate.like_ratio_auc(valid_xs), title=f"{c.name}: {name}")


def residual_confirm(r: Recipe) -> Callable[[nnx.Module], dict] | None:
  """For a residual model with `fusion.residual_confirm_size` != 0: the stage's last check (`Stage.confirm`). The
  best validated step is scored on that many validation prompts (seeded; -1: the whole split) and kept only if its
  paired-bootstrap 95% interval against the encoder alone (the stage's start) lies above zero."""
  n = r.config.fusion.residual_confirm_size
  if not (r.model.residual and n):
    return None
  if n > len(r.splits.valid):
    raise ConfigError(f"config.fusion.residual_confirm_size={n}, but the valid split has {len(r.splits.valid)} "
                      "prompts: lower it, or use -1 for all of them")
  xs = [r.splits.valid[i] for i in fewshot.fewshot_positions(len(r.splits.valid), n if n > 0 else None,
                                                             r.config.data.fewshot_seed)]

  def check(model: nnx.Module) -> dict:
    p_yes = r.scorer(model, r.eval_batches(xs, r.answer_spec, name="confirm"), desc="confirm").p_yes
    c = evaluate.paired_bootstrap(p_yes, feedback.like_probabilities(model, xs), [x.label for x in xs])
    return {"keep": bool(c["ci95"][0] > 0), "n": c["n"], "auc": c["auc_a"], "encoder_auc": c["auc_b"],
            "difference": c["difference"], "ci95": c["ci95"]}
  return check


def pretrain_encoder(r: Recipe, workdir: pathlib.Path) -> dict | None:
  """Runs the encoder stage alone (benchmarks): its summary with `best_valid_auc`, or None when it is off."""
  stage = encoder_stage(r, pathlib.Path(workdir))
  if stage is None:
    return None
  summary = trainer.run_stage(stage, r.model, r.mesh)
  return summary | {"best_valid_auc": summary["valid_auc"], "seconds": summary["wall_s"]}


def fit_stage(r: Recipe, spec: fused_data.PromptSpec, pool: Sequence[Interaction], steps: int,
              loss_weights: Mapping[str, float], seed: int, workdir: pathlib.Path, trains=nnx.Param,
              validate: bool = False) -> dict:
  """`steps` updates of `trains` (default every trainable parameter) on `pool` with `spec`'s prompts; unvalidated
  (benchmarks run their own scoring) unless `validate`, which keeps the best validated step as `rec_stage` does
  (for a residual model: step 0, its encoder, unless a later validation beats it). Returns the stage's summary
  (`best_step`, `valid_auc`) with `seconds`, the time taken."""
  t0 = time.time()
  name = "fused" if spec.num_soft_tokens or r.model.residual else "text"
  summary = trainer.run_stage(rec_stage(r, name, spec, pool, steps, loss_weights, pathlib.Path(workdir), seed=seed,
                                        trains=trains, validate=validate), r.model, r.mesh)
  if summary["preempted"]:  # a half-trained model must not be scored as the cell's result
    raise KeyboardInterrupt(f"stopped at step {summary['steps']} of {steps} of {name}")
  return summary | {"seconds": time.time() - t0}


def stages(r: Recipe, workdir: pathlib.Path, pool: Sequence[Interaction]) -> list[trainer.Stage]:
  """Encoder pretraining (WORKDIR/encoder), stage 1: text-only LoRA (WORKDIR/text), stage 2: fused prompts
  training everything trainable (WORKDIR), validated for early stopping and the best checkpoint. Residual fusion
  (`fusion.mode`) trains `Recipe.stage2_trains` on `Recipe.answer_spec`'s prompts; its stage 1 is off
  (`runconfig.validate`), so LoRA starts at zero and the model at its encoder."""
  c = r.config
  out = [s for s in [encoder_stage(r, workdir / "encoder")] if s is not None]
  for name, spec, block, folder, trains in [("text", r.text, c.stage1, workdir / "text", nnx.LoRAParam),
                                             ("fused", r.answer_spec, c.stage2, workdir, r.stage2_trains)]:
    if block.steps > 0:
      xs = list(pool) + fewshot.history_targets(pool, block.history_targets, c.seed)
      out.append(rec_stage(r, name, spec, xs, block.steps, block.loss_weights, folder, trains=trains,
                           validate=name == "fused"))
  return out


def score_split(r: Recipe, split: str, workdir: pathlib.Path | None = None) -> dict:
  """AUC of the fused model on the prompts `split` scores (`configured.eval_positions`) and the like-ratio reference
  on them; with `workdir`, also WORKDIR/eval/<split>_predictions.jsonl."""
  positions = configured.eval_positions(r.config, r.splits, split)
  xs = [getattr(r.splits, split)[i] for i in positions]
  scores = r.score(xs, r.answer_spec, desc=split)
  p_yes, label = scores.p_yes, scores.label
  if workdir is not None and jax.process_index() == 0:
    predictions.write(workdir, split, positions, label, p_yes)
  return {"auc": evaluate.auc(p_yes, label), "n": len(xs),
          "like_ratio_auc": evaluate.like_ratio_auc(xs), "p_yes_spread": float(np.ptp(p_yes))}


SUMMARY = "summary.json"


def train(config: ConfigDict, workdir: str | pathlib.Path, log: Callable[[str], None] = print) -> dict:
  """The stages of `stages` through the one trainer, then valid (from the last stage) and test AUC; returns and
  writes the summary. Killed at any step, the same command goes on from the last checkpoint of the stage it
  was in; run again once finished, it returns the saved summary."""
  workdir, t0 = pathlib.Path(workdir), time.time()
  runconfig.validate(config)
  sharding.maybe_initialize_distributed(config)
  with trainer.RunLock(workdir):
    return _train(config, workdir, t0, log)


def _train(config: ConfigDict, workdir: pathlib.Path, t0: float, log: Callable[[str], None]) -> dict:
  d = config.data
  if (workdir / SUMMARY).is_file():
    runconfig.check_resume(config, workdir)
    log(f"{workdir} is finished: its summary follows (delete {workdir / SUMMARY} to score it again)")
    return json.loads((workdir / SUMMARY).read_text())
  r = build(config)
  configured.check_splits(config, r.splits)
  pool = configured.train_interactions(config, r.splits)
  summaries = trainer.run(stages(r, workdir, pool), r.model, r.mesh, log)
  by_stage = {s["stage"]: s for s in summaries}
  if summaries and summaries[-1]["preempted"]:
    return summaries[-1]
  if "fused" not in by_stage:  # no stage 2: the model as stage 1 (or pretraining) left it
    ckpts = checkpoint.Checkpoints(workdir)
    try:
      ckpts.save_best(0, nnx.split(r.model, nnx.Param, ...)[1], {"step": 0})
    finally:
      ckpts.close()
  valid = by_stage.get("fused", {}).get("valid_auc")
  valid_xs = configured.eval_interactions(config, r.splits, "valid")
  reference = evaluate.like_ratio_auc(valid_xs)
  encoder = by_stage.get("encoder")
  summary = {"stage": "fused", "steps": sum(s["steps"] for s in summaries if s["stage"] != "encoder"),
             "best_step": by_stage.get("fused", {}).get("best_step"), "shots": len(pool),
             "encoder_valid_auc": None if encoder is None else encoder["valid_auc"],
             **({} if encoder is None else {"encoder_valid_n": len(r.splits.valid)}),
             "valid_auc": valid if valid is not None else score_split(r, "valid")["auc"], "valid_n": len(valid_xs),
             "valid_like_ratio_auc": reference, "tokens_per_s": by_stage.get("fused", {}).get("tokens_per_s"),
             "collapsed": by_stage.get("fused", {}).get("collapsed"),
             **({"confirm": by_stage["fused"]["confirm"]} if "confirm" in by_stage.get("fused", {}) else {})}
  if d.test_size != 0:
    test = score_split(r, "test", workdir)
    summary.update(test_auc=test["auc"], test_like_ratio_auc=test["like_ratio_auc"],
                   collapsed=evaluate.collapsed(summary["collapsed"], test=test["p_yes_spread"]))
  summary["wall_s"] = time.time() - t0
  if jax.process_index() == 0:
    checkpoint.write_text(workdir / SUMMARY, json.dumps(summary, indent=2) + "\n")
  return summary


def evaluate_split(config: ConfigDict, workdir: str | pathlib.Path, split: str = "test") -> dict:
  """AUC of the saved fused model on `split` (its configured subset); writes WORKDIR/eval/<split>_metrics.json
  and <split>_predictions.jsonl."""
  workdir, t0 = pathlib.Path(workdir), time.time()
  runconfig.check_model(config, workdir)
  trained = runconfig.trained_domain(workdir)
  if trained not in (None, config.data.domain):
    raise ConfigError(f"{workdir} was trained on {trained}: its encoder's item table holds {trained}'s item ids "
                      f"and none of {config.data.domain}'s, so its soft tokens would read other items. Score a "
                      f"text-only run across domains instead (python eval.py --config=configs/tallrec_{trained}.py "
                      f"--workdir=<its run> --config.data.domain={config.data.domain})")
  r = build(config)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    params, meta = ckpts.restore_best(nnx.split(r.model, nnx.Param, ...)[1])
  finally:
    ckpts.close()
  nnx.update(r.model, params)
  metrics = {**score_split(r, split, workdir), "best_step": meta["step"], "wall_s": time.time() - t0}
  if jax.process_index() == 0:
    predictions.write_metrics(workdir, split, metrics)
  return metrics
