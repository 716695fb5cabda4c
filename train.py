"""Trains per `--config` (default configs/book.py) in `--workdir` (default runs/<config name>), resuming there.

Configs with a `fusion` block run the CLCLMRec recipe: encoder pretraining, then residual fusion
(configs/book.py, movie.py: the encoder's logit + what LoRA adds, kept only if it beats the encoder) or text-only
stage 1 and soft-token stage 2 (configs/book_soft_tokens.py, movie_soft_tokens.py), then valid and test AUC
(contrastive/recipe.py); the others without a
`dataset` (configs/tallrec_book.py, tallrec_movie.py, tiny.py) TALLRec's instruct -> rec LoRA tuning
(train/loop.py); configs with a `dataset` (configs/pretrain_beauty.py, pretrain_ml100k.py) pretrain the
sequence encoder (contrastive/pretrain.py); configs with a `calrec` block (configs/calrec_ml100k.py,
calrec_beauty.py, tiny_calrec.py) fine-tune the LLM on next-item text in CALRec's two stages (seqrec/calrec.py);
configs with a `candidates` block (configs/cand_ml100k.py, cand_beauty.py, tiny_cand.py) LoRA-tune it on LLaRA's
20-candidate task, optionally mixed with auxiliary-task prompts (seqrec/candidates.py).
All of them are stage lists of the one trainer (train/trainer.py).
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

from absl import app, flags, logging
from ml_collections import config_flags

from clclm_jax.contrastive import pretrain, recipe
from clclm_jax.data import configured, fetch, sequences
from clclm_jax.seqrec import calrec, candidates
from clclm_jax.train import cli, loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/book.py", "Config file; override fields with --config.key=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics.jsonl); default runs/<config name>.")


def data_groups(config) -> list[str]:
  """The built-in data a config reads (`python -m clclm_jax.data fetch --only ...` groups)."""
  group = lambda name: "movie" if name == "ml100k" else name  # noqa: E731  (MovieLens is fetched as "movie")
  if "calrec" in config:
    return [group(name) for name in calrec.dataset_names(config)]
  if "candidates" in config:
    return [group(config.data.dataset)]
  if "dataset" in config:
    return [group(config.dataset)]
  groups = [] if configured.uses_files(config) else [config.data.domain]
  return groups + (["instruct"] if "instruct" in config.get("stages", ()) else [])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  cli.enable_compilation_cache()
  config = _CONFIG.value
  workdir = _WORKDIR.value or f"runs/{config.name}"
  if groups := [g for g in data_groups(config) if g in fetch.GROUPS]:
    fetch.ensure_data(groups)  # with no data folder: downloads what the config reads into the cache, and says so
  if "candidates" in config:  # LLaRA's candidate task (+ auxiliary-task prompts), text-only LoRA
    print(candidates.format_summary(candidates.train(config, workdir)))
    print(f"{'run folder':<22}{workdir} (config.json, metrics.jsonl, curves.png, checkpoints, eval/)")
    return
  if "calrec" in config:  # CALRec: next-item generation + two-tower InfoNCE, mixture then target stage
    print(calrec.format_summary(calrec.train(config, workdir)))
    print(f"{'run folder':<22}{workdir} (config.json, metrics.jsonl, curves.png, checkpoints, eval/)")
    return
  if "dataset" in config:  # encoder pretraining on sequences (configs/pretrain_*.py)
    print(pretrain.format_summary(pretrain.train(config, sequences.load(config.dataset), workdir)))
    print(f"{'run folder':<18}{workdir} (config.json, metrics.jsonl, curves.png, checkpoints)")
    return
  summary = recipe.train(config, workdir) if "fusion" in config else loop.train(config, workdir)
  print(loop.format_summary(summary, config, workdir, config_flags.get_config_filename(flags.FLAGS["config"])))


if __name__ == "__main__":
  app.run(cli.clear_errors(main), flags_parser=cli.parse_flags)
