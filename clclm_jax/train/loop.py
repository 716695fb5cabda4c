"""TALLRec from a config: model, data and the stage list the one trainer (`train/trainer.py`) runs.

Stages (`config.stages`): "instruct" (Alpaca instruction tuning, in WORKDIR/instruct) and "rec"
(TALLRec rec tuning, in WORKDIR, initialised from the previous stage's LoRA). The last stage is
evaluated on the test split with its best checkpoint.
"""

import dataclasses
import json
import functools
import pathlib
import time

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
import transformers

from clclm_jax.data import fewshot, instruct, paths, pipeline, prompts, tallrec, tokenize
from clclm_jax.data.records import Interaction
from clclm_jax.model import loading, lora, peft
from clclm_jax.model.config import LoraConfig, presets
from clclm_jax.model.llama import Llama
from clclm_jax.train import (checkpoint, evaluate, predictions, runconfig, sharding, state as state_lib,
                             trainer)
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
    check_adapter(config, lc.init_from)
    peft.load_peft(model, lc.init_from)
  return model, tokenizer


def check_adapter(config: ConfigDict, adapter_dir: str) -> None:
  """Refuses a PEFT adapter (`lora.init_from`) of another rank, alpha or targets than `config.lora`: it would
  train at the adapter's shape while the run records the config's, and scoring would then fail."""
  path = pathlib.Path(adapter_dir) / peft.CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f"config.lora.init_from={adapter_dir!r}: no {peft.CONFIG_FILE} there (a PEFT adapter folder)")
  saved, lc = json.loads(path.read_text()), config.lora
  pairs = [("r", "r", lc.r), ("alpha", "lora_alpha", lc.alpha)]
  diff = [f"lora.{name}: {saved.get(key)!r} in the adapter, {value!r} in the config" for name, key, value in pairs
          if saved.get(key) is not None and float(saved[key]) != float(value)]
  targets = saved.get("target_modules")
  if targets is not None and sorted(targets) != sorted(lc.targets):
    diff.append(f"lora.targets: {sorted(targets)} in the adapter, {sorted(lc.targets)} in the config")
  if diff:
    raise ConfigError(f"config.lora.init_from={adapter_dir!r} does not fit the config ({'; '.join(diff)}): set "
                      "the config's lora fields to the adapter's")


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


def check_eval_labels(config: ConfigDict, sp: tallrec.TallrecSplits) -> None:
  """AUC needs both labels among the prompts each split scores: checked before training, not after it."""
  for split in ("valid", "test"):
    if split == "test" and (config.data.test_size == 0 or not getattr(sp, split)):
      continue
    labels = {x.label for x in eval_interactions(config, sp, split)}
    if len(labels) < 2:
      source = (f"config.data.files.{split}={config.data.files[split]!r}" if uses_files(config)
                else f"the built-in {config.data.domain} {split} split")
      raise ConfigError(f"{source}: the prompts {split} scores all have the label {prompts.ANSWERS[labels.pop()]!r}, "
                        f"and AUC needs both; give {split} prompts of both labels, or a larger data.{split}_size")


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


def tallrec_stage(config: ConfigDict, name: str, workdir: pathlib.Path, tokenizer, scorer: evaluate.Scorer,
                  sp: tallrec.TallrecSplits | None) -> trainer.Stage:
  """A TALLRec stage as data: "instruct" (Alpaca instruction tuning; batch size, steps and learning rate from
  `config.instruct`) or "rec" (Yes/No rec tuning on `data.shots` prompts, validated by AUC)."""
  t, optim = config.train, config.optim
  if name == "rec":
    examples, evals = rec_data(config, tokenizer, splits=("valid",), sp=sp)
    batch_size, max_steps = t.batch_size, t.max_steps
    validate = lambda model: scorer(model, evals["valid"], desc="valid").metrics()  # noqa: E731
  elif name == "instruct":
    examples, _ = instruct_data(config, tokenizer)
    batch_size, max_steps, validate = config.instruct.batch_size, config.instruct.max_steps, None
    optim = ConfigDict({**optim.to_dict(), "lr": config.instruct.lr, "warmup_steps": config.instruct.warmup_steps})
  else:
    raise ConfigError(f"config.stages holds {name!r}: the TALLRec stages are 'instruct' and 'rec'")
  steps = max_steps if max_steps > 0 else t.num_epochs * max(1, len(examples) // batch_size)
  batches = lambda: iter(pipeline.train_dataset(  # noqa: E731
      examples, batch_size=batch_size, seed=config.seed, pad_multiple=config.data.pad_multiple, shard_index=0,
      shard_count=1))
  reference = like_ratio_references(config, ("valid",), sp)["valid_like_ratio_auc"] if name == "rec" else None
  return trainer.Stage(
      name, workdir, batches, dict(config.loss_weights), steps, optim, batch_size,
      min(t.micro_batch_size, batch_size), trains=nnx.Param, validate=validate, eval_every=t.eval_every,
      patience=t.patience, checkpoint_every=t.checkpoint_every, seed=config.seed, config=config,
      valid_reference=reference, title=f"{config.name}: {name} stage")


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
                   tokenizer=None, mesh=None, scorer: evaluate.Scorer | None = None) -> dict:
  """Scores `split` with the best checkpoint; writes WORKDIR/eval/<split>_metrics.json and
  <split>_predictions.jsonl (P(Yes) per prompt). With another `data.domain` than the run trained on (TALLRec's
  cross-domain test), the files are <split>_<domain>_*."""
  workdir = pathlib.Path(workdir)
  runconfig.check_model(config, workdir)
  mesh = mesh or sharding.make_mesh(config.mesh)
  if model is None:
    model, tokenizer = build_model(config)
  if scorer is None:
    trainer.place(model, mesh)
    scorer = evaluate.make_scorer(model, mesh, *tokenize.answer_token_ids(tokenizer, config.data.template))
  params, meta = best_params(workdir, model, mesh)
  nnx.update(model, params)
  sp = rec_splits(config)
  _, evals = rec_data(config, tokenizer, splits=(split,), sp=sp)
  t0 = time.time()
  scores = scorer(model, evals[split], desc=split)
  reference = like_ratio_references(config, (split,), sp)[f"{split}_like_ratio_auc"]
  metrics = {**scores.metrics(), "like_ratio_auc": reference, "best_step": meta["step"], "wall_s": time.time() - t0,
             "domain": config.data.domain, "trained_on": runconfig.trained_domain(workdir) or config.data.domain}
  if jax.process_index() == 0:
    name = runconfig.eval_name(config, workdir, split)
    predictions.write(workdir, name, eval_positions(config, sp, split)[scores.index], scores.label, scores.p_yes)
    predictions.write_metrics(workdir, name, metrics)
  return metrics


def train(config: ConfigDict, workdir: str | pathlib.Path) -> dict:
  """All stages of `config` through the one trainer (`config.stages`; the last in `workdir`, the others in
  WORKDIR/<stage>), then the test AUC of the last stage's best checkpoint; returns the summary."""
  workdir = pathlib.Path(workdir)
  runconfig.validate(config)
  sharding.maybe_initialize_distributed(config)
  mesh = sharding.make_mesh(config.mesh)
  with trainer.RunLock(workdir):
    model, tokenizer = build_model(config)
    scorer = evaluate.make_scorer(model, mesh, *tokenize.answer_token_ids(tokenizer, config.data.template))
    sp = rec_splits(config) if "rec" in config.stages else None
    if sp is not None:
      check_eval_labels(config, sp)
    names = list(config.stages)
    stages = [tallrec_stage(config, name, workdir if i == len(names) - 1 else workdir / name, tokenizer, scorer,
                            sp) for i, name in enumerate(names)]
    summary = trainer.run(stages, model, mesh)[-1]
    if summary["preempted"]:
      return summary
    if names[-1] == "rec":
      summary.update(like_ratio_references(config, ("valid",), sp))
      if config.data.test_size != 0:
        test = evaluate_split(config, workdir, "test", model, tokenizer, mesh, scorer)
        summary.update(test_auc=test["auc"], test_like_ratio_auc=test["like_ratio_auc"])
    return summary


def published_auc(config: ConfigDict | None, shots: int | None) -> float | None:
  """TALLRec-7B's published test AUC (x 100) for the run's domain and shots, where the run scores TALLRec's
  whole built-in test set at one of the paper's shot counts; else None."""
  if config is None or uses_files(config) or config.data.test_size > 0:
    return None
  return tallrec.PUBLISHED_AUC.get(config.data.domain, {}).get(shots)


def format_summary(summary: dict, config: ConfigDict | None = None, workdir: str | pathlib.Path | None = None,
                   config_file: str | None = None) -> str:
  """The end-of-run table: AUCs with the history like-ratio on the same prompts (and TALLRec-7B's published
  figure for the same shots) beside them, wall time, where the model and predictions are, what to run next."""
  shots = summary.get("shots", None if config is None else config.data.shots)
  rows = [("best step", summary.get("best_step")), ("valid AUC", summary.get("valid_auc")),
          ("test AUC", summary.get("test_auc")), ("tokens/s (train)", summary.get("tokens_per_s"))]
  if "encoder_valid_auc" in summary:  # fused runs (contrastive/recipe.py)
    rows.insert(1, ("encoder valid AUC", summary["encoder_valid_auc"]))
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
  lines = []
  if summary.get("preempted"):
    lines.append(f"preempted at step {summary['steps']} of {summary['stage']}: run the same command again to "
                 "continue")
  for k, v in rows:
    ref = summary.get(k.split()[0] + "_like_ratio_auc") if k in ("valid AUC", "test AUC") else None
    note = f"   history like-ratio on the same prompts: {ref:.4f}" if ref is not None and v is not None else ""
    lines.append(f"{k:<18}{fmt(v):>12}{note}")
  published = published_auc(config, shots)
  if published is not None and summary.get("test_auc") is not None:
    lines.append(f"{'':<30}   TALLRec, LLaMA-7B, {shots}-shot (published): {published / 100:.4f}")
  if (wall := summary.get("wall_s")) is not None:
    lines.append(f"{'wall time':<18}{f'{int(wall // 60)} min {wall % 60:02.0f} s':>12}")
  if workdir is not None:
    w = pathlib.Path(workdir)
    lines.append(f"{'run folder':<18}{w} (config.json, metrics.jsonl, curves.png, checkpoints/)")
    if (w / "eval" / "test_predictions.jsonl").is_file():
      lines.append(f"{'predictions':<18}{w / 'eval' / 'test_predictions.jsonl'} (record, label, p_yes)")
    if config_file and not summary.get("preempted"):
      again = f"python eval.py --config={config_file} --workdir={w}"
      lines += [f"{'score again':<18}{again} [--split=valid]",
                f"{'compare':<18}{again} --compare_to=<another run folder>  (paired 95% interval)"]
      if "fusion" not in config:
        lines.append(f"{'export':<18}{again} --export_peft=<folder>  (a PEFT adapter for transformers)")
  return "\n".join(lines)
