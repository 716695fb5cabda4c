"""Scores a split with the best checkpoint in `--workdir` (WORKDIR/eval/<split>_metrics.json), or exports its LoRA.

A CALRec run (a config with a `calrec` block) is scored by ranking: full-catalogue Recall@1/5/10 and NDCG@5/10 of
its dense and generation + BM25 rankings (`config.eval`) on `data.valid_size` / `data.test_size` seeded users.

Cross-domain (TALLRec's generalisation test): a text-only run scores another domain's test set with
`--config.data.domain=book` (files WORKDIR/eval/test_book_*); a fused run refuses, its encoder knowing only
the items of the domain it trained on.
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import json
import pathlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clclm_jax.contrastive import recipe
from clclm_jax.seqrec import calrec
from clclm_jax.train import checkpoint, cli, loop, predictions, runconfig, sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/book.py", "Config file; override fields with --config.key=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder of train.py; default runs/<config name>.")
_SPLIT = flags.DEFINE_enum("split", "test", ["valid", "test"], "Which split to score.")
_COMPARE_TO = flags.DEFINE_string("compare_to", None, "Another run folder whose same split is already scored: "
                                  "prints both AUCs and a 95% paired-bootstrap interval of their difference.")
_EXPORT_PEFT = flags.DEFINE_string("export_peft", None, "Instead of scoring, write the best checkpoint's LoRA "
                                   "as a Hugging Face PEFT adapter folder here.")


def score_calrec(config, workdir: pathlib.Path, split: str) -> dict:
  """Recall / NDCG of a CALRec run on `split`; writes WORKDIR/eval/<split>_metrics.json (the generated lines go
  to <split>_generations.jsonl)."""
  if _COMPARE_TO.value or _EXPORT_PEFT.value:
    raise app.UsageError("--compare_to / --export_peft compare AUCs / export TALLRec LoRA: a CALRec run is scored "
                         "by ranking only (benchmarks/seqrec_table.py compares methods)")
  field = "valid_size" if split == "valid" else "test_size"
  if config.data[field] == 0:
    raise app.UsageError(f"config.data.{field}=0 scores no user: pass --config.data.{field}=-1 (all) or a count")
  metrics = calrec.evaluate(config, workdir, split, config.data[field])
  if jax.process_index() == 0:
    checkpoint.write_text(workdir / "eval" / f"{split}_metrics.json", json.dumps(metrics, indent=2) + "\n")
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  cli.enable_compilation_cache()
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config)
  workdir = _WORKDIR.value or f"runs/{config.name}"
  if "calrec" in config:
    print(json.dumps(score_calrec(config, pathlib.Path(workdir), _SPLIT.value), indent=2))
    return
  name = runconfig.eval_name(config, pathlib.Path(workdir), _SPLIT.value)  # <split>, or <split>_<domain> across domains
  if _COMPARE_TO.value:
    predictions.read(_COMPARE_TO.value, name)  # fail before scoring, not after
  if "fusion" in config:
    if _EXPORT_PEFT.value:
      raise app.UsageError("--export_peft: a fused model is LoRA + encoder + projector; PEFT holds only the "
                           "LoRA, which cannot score without them. Export a text-only config's run instead.")
    metrics = recipe.evaluate_split(config, workdir, _SPLIT.value)
  elif _EXPORT_PEFT.value:
    print(f"PEFT adapter written to {loop.export_best_peft(config, workdir, _EXPORT_PEFT.value)}")
    return
  else:
    metrics = loop.evaluate_split(config, workdir, _SPLIT.value)
  print(json.dumps(metrics, indent=2))
  if _COMPARE_TO.value:
    print(predictions.format_comparison(predictions.compare(workdir, _COMPARE_TO.value, name)))


if __name__ == "__main__":
  app.run(cli.clear_errors(main), flags_parser=cli.parse_flags)
