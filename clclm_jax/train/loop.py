"""The trainer: build model and data from a config, train with periodic validation AUC, resume exactly.

Stages (`config.stages`): "instruct" (Alpaca instruction tuning, in WORKDIR/instruct) and "rec"
(TALLRec rec tuning, in WORKDIR, initialised from the previous stage's LoRA). The last stage is
evaluated on the test split with its best checkpoint.
"""

import dataclasses
import functools
import json
import pathlib
import signal
import threading
import time

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
import tqdm
import transformers

from clclm_jax.data import fewshot, instruct, paths, pipeline, prompts, tallrec, tokenize
from clclm_jax.data.records import Interaction
from clclm_jax.model import loading, lora, peft
from clclm_jax.model.config import LoraConfig, presets
from clclm_jax.model.llama import Llama
from clclm_jax.train import (checkpoint, curves, evaluate, predictions, runconfig, sharding, state as state_lib,
                             step as step_lib)
from clclm_jax.train.errors import ConfigError


def smollm2_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """The SmolLM2 tokenizer alone, cached as tokenizer.json in CLCLM_CACHE (~/.cache/clclm_jax)."""
  cache = loading.cache_root() / "smollm2-tokenizer"
  if not (cache / "tokenizer.json").is_file():
    import gguf  # pylint: disable=g-import-not-at-top
    path = loading.smollm2_gguf()
    loading.gguf_tokenizer(gguf.GGUFReader(str(path)), path).save_pretrained(cache)
  return transformers.PreTrainedTokenizerFast.from_pretrained(cache)


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """UTF-8 bytes as tokens (256) plus <s> and </s>: a 258-token vocabulary for tiny test models."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<s>", "</s>"])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="</s>")


@functools.partial(nnx.jit, static_argnums=(0, 1), static_argnames=("dtype", "quantize", "seed"))
def random_model(cfg, lora_cfg: LoraConfig, *, dtype, quantize, seed: int) -> Llama:
  """A random `Llama` with LoRA, built in one compiled call (eagerly, every op and shape compiles apart)."""
  model = Llama(cfg, dtype=dtype, quantize=quantize, rngs=nnx.Rngs(seed))
  return lora.add_lora(model, lora_cfg, jax.random.key(seed))


def build_model(config: ConfigDict):
  """(model with LoRA, tokenizer) from `config.model` and `config.lora`."""
  m, lc = config.model, config.lora
  lora_cfg = LoraConfig(r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets))
  if m.preset:  # A random model of a preset's shape, with the vocabulary of `model.tokenizer`.
    tokenizers = {"bytes": byte_tokenizer, "smollm2": smollm2_tokenizer}
    if m.tokenizer not in tokenizers:
      raise ConfigError(f"config.model.tokenizer={m.tokenizer!r}: use one of {sorted(tokenizers)}")
    tokenizer = tokenizers[m.tokenizer]()
    cfg = dataclasses.replace(presets[m.preset], vocab_size=len(tokenizer),
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = random_model(cfg, lora_cfg, dtype=loading.DTYPES[m.dtype], quantize=m.quantize or None, seed=config.seed)
  else:
    model, tokenizer = loading.load_model(m.source, dtype=m.dtype, quantize=m.quantize or None,
                                          lora=lora_cfg, lora_seed=config.seed)
  model.remat = m.remat
  if lc.init_from:
    peft.load_peft(model, lc.init_from)
  return model, tokenizer


def _eval_batches(examples, config: ConfigDict):
  return pipeline.eval_dataset(examples, batch_size=config.train.eval_batch_size // jax.process_count(),
                               pad_multiple=config.data.pad_multiple, max_widths=config.data.eval_widths)


def uses_files(config: ConfigDict) -> bool:
  """Whether `data.files` names your own TALLRec-format JSON files in place of the built-in splits."""
  return any(config.data.files[k] for k in ("train", "valid", "test"))


def _data_file(config: ConfigDict, name: str) -> pathlib.Path | None:
  """`data.files.<name>` as given (absolute, or relative to the working directory), else under CLCLM_DATA."""
  given = config.data.files[name]
  if not given:
    return None
  path = pathlib.Path(given)
  if path.is_file():
    return path
  try:
    under_data = paths.data_root() / given
  except FileNotFoundError:  # no data root: the file can only be where the user said
    under_data = path
  if not path.is_absolute() and under_data.is_file():
    return under_data
  raise ConfigError(f"config.data.files.{name}={given!r}: no such file (looked in the working directory "
                    f"and in CLCLM_DATA); give an absolute path")


def rec_splits(config: ConfigDict) -> tallrec.TallrecSplits:
  """The TALLRec splits of `data.domain`: built in (MovieLens-100K / TALLRec's book files), or `data.files`."""
  d = config.data
  if not uses_files(config):
    if d.domain not in tallrec.DOMAINS:
      raise ConfigError(f"config.data.domain={d.domain!r}: the built-in data is {' and '.join(tallrec.DOMAINS)}; "
                        "for other items give your own TALLRec-format files (config.data.files.train / valid / test)")
    return tallrec.tallrec_splits(d.domain, seed=d.split_seed, book_valid_size=d.book_valid_size)
  try:
    prompts.check_domain(d.domain)
  except ValueError as e:
    raise ConfigError(f"config.data.{e}") from None
  missing = [k for k in ("train", "valid") if not d.files[k]]
  if missing:
    raise ConfigError(f"config.data.files: set {' and '.join(missing)} too (train and valid are needed, test is "
                      "optional)")
  if not d.files.test and d.test_size != 0:
    raise ConfigError("config.data.files.test is empty: set it, or data.test_size=0 to skip the test evaluation")
  return tallrec.tallrec_files(d.domain, *(_data_file(config, k) for k in ("train", "valid", "test")))


def _positions(config: ConfigDict, sp: tallrec.TallrecSplits, split: str, field: str) -> np.ndarray:
  """Positions in `split` of its seeded `fewshot` subset of `data.<field>` (all when <= 0); a size beyond the
  split fails naming the config field to change."""
  n, size = config.data[field], len(getattr(sp, split))
  if n > size:
    raise ConfigError(f"config.data.{field}={n}, but the {split} split has {size} prompts: lower it, or "
                      f"set it <= 0 for all of them")
  return fewshot.fewshot_positions(size, n if n > 0 else None, config.data.fewshot_seed)


def eval_positions(config: ConfigDict, sp: tallrec.TallrecSplits, split: str) -> np.ndarray:
  """Which records of `split` evaluation scores, in scoring order: a seeded subset of `data.valid_size` /
  `data.test_size` (the whole split when <= 0). Positions are record indices in the split's file, where it
  has one (TALLRec's test.json, `data.files`)."""
  return _positions(config, sp, split, f"{split}_size")


def eval_interactions(config: ConfigDict, sp: tallrec.TallrecSplits, split: str) -> list[Interaction]:
  """The prompts of `split` that evaluation scores (`eval_positions`)."""
  return [getattr(sp, split)[i] for i in eval_positions(config, sp, split)]


def train_interactions(config: ConfigDict, sp: tallrec.TallrecSplits) -> list[Interaction]:
  """The few-shot training set: `data.shots` prompts of the training pool (all when <= 0)."""
  return [sp.train[i] for i in _positions(config, sp, "train", "shots")]


def like_ratio_references(config: ConfigDict, splits=("valid", "test"), sp=None) -> dict[str, float]:
  """`{split}_like_ratio_auc`: the no-training reference (`evaluate.like_ratio_auc`) on the prompts each split
  scores, so a run's AUC can be read against what the histories alone give."""
  sp = rec_splits(config) if sp is None else sp
  return {f"{s}_like_ratio_auc": evaluate.like_ratio_auc(eval_interactions(config, sp, s)) for s in splits}


def rec_data(config: ConfigDict, tokenizer, splits=("valid", "test"), sp=None):
  """(training examples, {split: eval batches}) for the TALLRec task of `config.data` (of `sp` when given)."""
  d, sp = config.data, rec_splits(config) if sp is None else sp
  encode = lambda xs: pipeline.tallrec_examples(  # noqa: E731
      xs, sp.catalogue, d.domain, tokenizer, cutoff_len=d.cutoff_len, train_on_inputs=d.train_on_inputs,
      template=d.template)
  evals = {s: _eval_batches(encode(eval_interactions(config, sp, s)), config) for s in splits}
  return encode(train_interactions(config, sp)), evals


def instruct_data(config: ConfigDict, tokenizer):
  records = instruct.read_alpaca(paths.data_path(config.instruct.file))
  if config.instruct.num_examples > 0:
    records = fewshot.fewshot(records, config.instruct.num_examples, config.data.fewshot_seed)
  return pipeline.alpaca_examples(records, tokenizer, cutoff_len=config.data.cutoff_len,
                                  train_on_inputs=config.data.train_on_inputs, template=config.data.template), {}


def stage_config(config: ConfigDict, stage: str) -> ConfigDict:
  """The instruct stage takes its batch size, steps and learning rate from `config.instruct`."""
  c = ConfigDict(config.to_dict())
  if stage == "instruct":
    c.train.batch_size, c.train.max_steps = config.instruct.batch_size, config.instruct.max_steps
    c.optim.lr, c.optim.warmup_steps = config.instruct.lr, config.instruct.warmup_steps
  return c


class MetricsLog:
  """WORKDIR/metrics.jsonl and TensorBoard events, written by process 0."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.on = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    if not self.on:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    kept = [r for r in curves.read_rows(self.path) if r["step"] <= resume_step]
    checkpoint.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

  def write(self, row: dict) -> None:
    if not self.on:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self.tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    if self.on:
      self.tb.close()


def _check_finite(metrics: dict, step: int) -> None:
  bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    terms = [k for k in bad if k.startswith("loss/")] or list(bad)
    raise FloatingPointError(f"step {step}: non-finite {bad}; first bad loss term(s): {terms}. "
                             "Lower optim.lr, check the batch at this step, or the loss weights.")


def train_stage(config: ConfigDict, workdir: pathlib.Path, stage: str, model, tokenizer, mesh,
                init_params=None) -> tuple[dict, nnx.State]:
  """Trains one stage in `workdir`, resuming from its latest checkpoint; returns (summary, params)."""
  workdir.mkdir(parents=True, exist_ok=True)
  t = config.train
  graphdef, params, frozen = state_lib.split_model(model)
  params = params if init_params is None else init_params
  sp = rec_splits(config) if stage == "rec" else None
  examples, evals = rec_data(config, tokenizer, sp=sp) if stage == "rec" else instruct_data(config, tokenizer)
  if t.batch_size % (t.micro_batch_size * jax.process_count()):
    raise ConfigError(f"config.train.batch_size={t.batch_size} must be a multiple of micro_batch_size x processes")
  total = t.max_steps if t.max_steps > 0 else t.num_epochs * max(1, len(examples) // t.batch_size)
  optim = ConfigDict({**config.optim.to_dict(), "total_steps": total})
  tx = state_lib.make_optimizer(optim)
  state = state_lib.init_state(params, tx, config.seed, mesh)
  data_iter = iter(pipeline.train_dataset(examples, batch_size=t.batch_size // jax.process_count(),
                                          seed=config.seed, pad_multiple=config.data.pad_multiple))
  ckpts = checkpoint.Checkpoints(workdir)
  if ckpts.latest.latest_step() is not None:
    runconfig.check_resume(config, workdir)
  if jax.process_index() == 0:
    runconfig.save(config, workdir)
  stopper = evaluate.EarlyStopping(t.patience)
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, data_state, meta = restored
    data_iter.set_state(data_state)
    stopper = evaluate.EarlyStopping(**meta["early_stopping"])
  start = int(state["step"])
  log = MetricsLog(workdir, start)
  state_sh = state_lib.state_shardings(params, tx, mesh)
  train_step = step_lib.compile_train_step(graphdef, frozen, tx, state_sh, mesh, loss_weights=dict(config.loss_weights),
                                           accum_steps=t.batch_size // t.micro_batch_size)
  frozen = sharding.put(frozen, sharding.state_sharding(frozen, mesh))
  yes_no = tokenize.answer_token_ids(tokenizer, config.data.template)
  eval_step = evaluate.compile_eval_step(graphdef, state_sh["params"], sharding.state_sharding(frozen, mesh),
                                         mesh, *yes_no)
  stop = threading.Event()
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set())
  n_tokens, t0 = 0, time.time()
  meta = lambda: {"config": config.to_dict(), "early_stopping": dataclasses.asdict(stopper)}  # noqa: E731
  with jax.set_mesh(mesh), tqdm.tqdm(total=total, initial=start, desc=stage,
                                      disable=jax.process_index() != 0) as bar:
    for step in range(start + 1, total + 1):
      batch = next(data_iter)
      state, metrics = train_step(state, sharding.global_batch(batch, mesh))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      _check_finite(metrics, step)
      n_tokens += int(batch["loss_mask"].sum()) * jax.process_count()
      row = {"step": step, **{f"train/{k}": v for k, v in metrics.items()}}
      if "valid" in evals and (step % t.eval_every == 0 or step == total):
        valid = evaluate.score(eval_step, state["params"], frozen, evals["valid"], mesh,
                               desc="valid").metrics()
        row.update({f"valid/{k}": v for k, v in valid.items()})
        stopper = stopper.update(valid["auc"], step)
        if stopper.best_step == step:
          ckpts.save_best(step, state["params"], {"step": step, "valid": valid})
      log.write(row)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", best_auc=f"{stopper.best:.4f}")
      bar.update(1)
      done = step == total or stopper.should_stop or stop.is_set()
      if done or step % t.checkpoint_every == 0 or "valid/auc" in row:
        ckpts.save_latest(state, data_iter.get_state(), meta())
      if done:
        break
  signal.signal(signal.SIGTERM, previous_handler)
  wall = time.time() - t0
  if "valid" not in evals:  # Stages without validation keep their last params as the best.
    ckpts.save_best(int(state["step"]), state["params"], {"step": int(state["step"])})
  summary = {"stage": stage, "steps": int(state["step"]), "total_steps": total, "preempted": stop.is_set(),
             "best_step": stopper.best_step, "valid_auc": stopper.best,
             **(like_ratio_references(config, ("valid",), sp) if "valid" in evals else {}),
             "tokens_per_s": n_tokens / max(wall, 1e-9), "wall_s": wall}
  log.close()
  ckpts.close()
  if jax.process_index() == 0:
    curves.write_curves(log.path, workdir / "curves.png", title=f"{config.name}: {stage} stage",
                        valid_reference=summary.get("valid_like_ratio_auc"))
  return summary, state["params"]


def best_params(workdir: pathlib.Path, model, mesh):
  """(params, meta) of the best checkpoint in `workdir`, sharded like the model's trainable state."""
  _, params, _ = state_lib.split_model(model)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    return ckpts.restore_best(sharding.put(params, sharding.state_sharding(params, mesh)))
  finally:
    ckpts.close()


def export_best_peft(config: ConfigDict, workdir: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes the best checkpoint's LoRA in `workdir` as a Hugging Face PEFT adapter folder."""
  runconfig.check_model(config, pathlib.Path(workdir))
  model, _ = build_model(config)
  params, _ = best_params(pathlib.Path(workdir), model, sharding.make_mesh(config.mesh))
  nnx.update(model, jax.device_get(params))
  base = config.model.source if not config.model.preset else f"random {config.model.preset} preset"
  return peft.export_peft(model, out_dir, base_model_name_or_path=base)


def evaluate_split(config: ConfigDict, workdir: str | pathlib.Path, split: str = "test", model=None,
                   tokenizer=None, mesh=None) -> dict:
  """Scores `split` with the best checkpoint; writes WORKDIR/eval/<split>_metrics.json and
  <split>_predictions.jsonl (P(Yes) per prompt)."""
  workdir = pathlib.Path(workdir)
  runconfig.check_model(config, workdir)
  mesh = mesh or sharding.make_mesh(config.mesh)
  if model is None:
    model, tokenizer = build_model(config)
  graphdef, params, frozen = state_lib.split_model(model)
  params_sh, frozen_sh = sharding.state_sharding(params, mesh), sharding.state_sharding(frozen, mesh)
  params, meta = best_params(workdir, model, mesh)
  sp = rec_splits(config)
  _, evals = rec_data(config, tokenizer, splits=(split,), sp=sp)
  eval_step = evaluate.compile_eval_step(graphdef, params_sh, frozen_sh, mesh,
                                         *tokenize.answer_token_ids(tokenizer, config.data.template))
  t0 = time.time()
  with jax.set_mesh(mesh):
    scores = evaluate.score(eval_step, params, sharding.put(frozen, frozen_sh), evals[split], mesh, desc=split)
  reference = like_ratio_references(config, (split,), sp)[f"{split}_like_ratio_auc"]
  metrics = {**scores.metrics(), "like_ratio_auc": reference, "best_step": meta["step"], "wall_s": time.time() - t0}
  if jax.process_index() == 0:
    predictions.write(workdir, split, eval_positions(config, sp, split)[scores.index], scores.label, scores.p_yes)
    predictions.write_metrics(workdir, split, metrics)
  return metrics


def train(config: ConfigDict, workdir: str | pathlib.Path) -> dict:
  """All stages of `config`, then the test AUC of the last stage's best checkpoint; returns the summary."""
  workdir = pathlib.Path(workdir)
  sharding.maybe_initialize_distributed(config)
  mesh = sharding.make_mesh(config.mesh)
  model, tokenizer = build_model(config)
  params, summary = None, {}
  for i, stage in enumerate(config.stages):
    last = i == len(config.stages) - 1
    summary, params = train_stage(stage_config(config, stage), workdir if last else workdir / stage,
                                  stage, model, tokenizer, mesh, init_params=params)
    if summary["preempted"]:
      return summary
  if config.stages[-1] == "rec" and config.data.test_size != 0:
    test = evaluate_split(config, workdir, "test", model, tokenizer, mesh)
    summary.update(test_auc=test["auc"], test_like_ratio_auc=test["like_ratio_auc"])
  return summary


def format_summary(summary: dict) -> str:
  """The end-of-run table; AUCs carry the history like-ratio on the same prompts beside them."""
  rows = [("best step", summary.get("best_step")), ("valid AUC", summary.get("valid_auc")),
          ("test AUC", summary.get("test_auc")), ("tokens/s (train)", summary.get("tokens_per_s")),
          ("wall time (s)", summary.get("wall_s"))]
  if "encoder_valid_auc" in summary:  # fused runs (contrastive/recipe.py)
    rows.insert(1, ("encoder valid AUC", summary["encoder_valid_auc"]))
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
  lines = []
  for k, v in rows:
    ref = summary.get(k.split()[0] + "_like_ratio_auc") if k in ("valid AUC", "test AUC") else None
    note = f"   history like-ratio on the same prompts: {ref:.4f}" if ref is not None and v is not None else ""
    lines.append(f"{k:<18}{fmt(v):>12}{note}")
  return "\n".join(lines)
