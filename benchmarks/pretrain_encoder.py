"""Pretrains the CLCLMRec sequence encoder and writes HR/NDCG on the leave-one-out test split.

  python benchmarks/pretrain_encoder.py --config=configs/pretrain_beauty.py [--config.time_budget_min=21]
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import json
import os
import pathlib
import platform
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from clclm_jax.contrastive import pretrain
from clclm_jax.data import sequences

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain_beauty.py")
_OUT = flags.DEFINE_string("out", "benchmarks/results", "folder for pretrain_<dataset>.{json,md}")
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics.jsonl; resumable); default a "
                               "temporary one")

# FEARec (SIGIR 2023) re-report, Beauty, leave-one-out, full ranking.
REFERENCE = {"beauty": {"CL4SRec": {"HR@10": 0.0683, "NDCG@10": 0.0317},
                        "CoSeRec": {"HR@10": 0.0752, "NDCG@10": 0.0430}}}


def loss_text(cfg, num_items: int) -> str:
  """One line naming the next-item CE variant and the contrastive term."""
  k = cfg.get("ce_negatives", 0)
  if not k:
    ce = f"full-softmax next-item CE over all {num_items} items"
  else:
    how = cfg.get("ce_sampling", "uniform")
    ce = (f"sampled-softmax next-item CE: each target against {k} {how}-sampled negatives shared by the step "
          f"(of {num_items} items{', logQ-corrected' if how != 'uniform' else ''})")
  at = (f"at {cfg.dropout_cl_positions} real positions drawn per batch" if cfg.get("dropout_cl_positions", 0)
        else "at its last position")
  extra = (f", + {cfg.dropout_cl_weight} x InfoNCE between two dropout passes of each sequence {at} (DuoRec)"
           if cfg.get("dropout_cl_weight", 0.0) else "")
  if cfg.get("same_target_cl_weight", 0.0):
    extra += (f", + {cfg.same_target_cl_weight} x InfoNCE between each sequence and another user's training "
              "prefix that precedes the same next item (DuoRec's supervised positives)")
  return f"Loss: {ce} at every real position, + {cfg.cl_weight} x InfoNCE (CoSeRec augmentations){extra}."


def markdown(cfg, summary) -> str:
  lines = [f"# Encoder pretraining: {summary['dataset']}", "",
           f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, jax devices x{jax.device_count()} "
           f"({jax.devices()[0].platform}); {summary['epochs']} epochs in {summary['train_seconds'] / 60:.1f} min "
           f"({summary['epoch_seconds_mean']:.1f} s/epoch mean, compiles included; stopped by {summary['stopped']}), "
           f"best valid NDCG@10 at epoch {summary['best_epoch']} (validation every {cfg.eval_every} epochs).",
           f"hidden {cfg.hidden}, {cfg.num_layers} layers, {cfg.num_heads} heads, max_len {cfg.max_len}, "
           f"dropout {cfg.dropout}/{cfg.attn_dropout}, batch {cfg.batch_size}, lr {cfg.lr}, lambda {cfg.cl_weight}, "
           f"tau {cfg.temperature}.", loss_text(cfg, summary["num_items"]),
           "Test: leave-one-out, exact full ranking over all items, best-valid parameters; history items "
           f"{'excluded' if cfg.exclude_history else 'kept'} (model selection and the first row), the other "
           "protocol in the second row when measured.",
           f"Command: `{summary['command']}`", "",
           "| model | HR@5 | HR@10 | NDCG@5 | NDCG@10 |", "| --- | --- | --- | --- | --- |"]
  lines += [f"| clclm-jax ({label}) | {test['HR@5']:.4f} | {test['HR@10']:.4f} | {test['NDCG@5']:.4f} | "
            f"{test['NDCG@10']:.4f} |" for label, test in common.encoder_test_rows(summary)]
  for name, ref in REFERENCE.get(summary["dataset"], {}).items():
    lines.append(f"| {name} (FEARec re-report) | - | {ref['HR@10']:.4f} | - | {ref['NDCG@10']:.4f} |")
  return "\n".join(lines) + "\n"


def main(_):
  cfg = _CONFIG.value
  data = sequences.load(cfg.dataset)
  summary = pretrain.train(cfg, data, _WORKDIR.value)
  summary["num_items"], summary["command"] = data.num_items, " ".join(["python"] + sys.argv)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  summary["config"] = cfg.to_dict()
  summary["reference"] = REFERENCE.get(summary["dataset"], {})
  (out / f"pretrain_{summary['dataset']}.json").write_text(json.dumps(summary, indent=2))
  (out / f"pretrain_{summary['dataset']}.md").write_text(markdown(cfg, summary))
  print(markdown(cfg, summary))


if __name__ == "__main__":
  app.run(main)
