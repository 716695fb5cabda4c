"""How much of evaluation is padding: the share of scored tokens after the shared prefix that are padding,
per domain and split, with batches padded to multiples of `data.pad_multiple` (`eval_widths` 0) and to the
data-chosen widths of `pipeline.batch_widths`. Deterministic (no model runs), under a minute.

  python benchmarks/eval_padding.py --out=benchmarks/results
"""

import argparse
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.model import build  # pylint: disable=wrong-import-position
from clclm_jax.train import evaluate, loop  # pylint: disable=wrong-import-position
from configs import tallrec_book, tallrec_movie  # pylint: disable=wrong-import-position

CONFIGS = {"movie": tallrec_movie, "book": tallrec_book}


def padding(batches) -> dict[str, Any]:
  """Real and padded tokens after the shared prefix (each real row up to its answer position)."""
  p = evaluate.shared_prefix(batches).size
  real = sum(int((b["answer_index"][b["index"] >= 0] + 1 - p).sum()) for b in batches)
  padded = sum(b["tokens"].shape[0] * (b["tokens"].shape[1] - p) for b in batches)
  return {"prefix": p, "real_tokens": real, "padded_tokens": padded, "padding_share": 1 - real / padded,
          "widths": sorted({int(b["tokens"].shape[1]) for b in batches}), "batches": len(batches)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--widths", default="0,6", help="eval_widths values to compare (0: multiples of pad_multiple)")
  args = p.parse_args(argv)
  tokenizer, rows = build.smollm2_tokenizer(), []
  for domain, module in CONFIGS.items():
    for w in map(int, args.widths.split(",")):
      config = module.get_config()
      config.data.eval_widths = w
      _, evals = loop.rec_data(config, tokenizer)
      for split, ds in evals.items():
        rows.append({"domain": domain, "split": split, "eval_widths": w,
                     "pad_multiple": config.data.pad_multiple, **padding([ds[i] for i in range(len(ds))])})
  table = common.markdown_table(
      ["domain", "split", "eval_widths", "batches", "widths (incl. prefix)", "padding after the prefix"],
      [[r["domain"], r["split"], r["eval_widths"] or f"0 (multiples of {r['pad_multiple']})", r["batches"],
        ", ".join(map(str, r["widths"])), f"{100 * r['padding_share']:.1f}%"] for r in rows])
  text = ("# Evaluation padding\n\nThe default configs' evaluation batches (batch 16, sorted by length); "
          "`python benchmarks/eval_padding.py --out=benchmarks/results`.\n\n" + table + "\n")
  result = {"argv": sys.argv, "rows": rows}
  common.write_result(args.out, "eval_padding", result, text)
  return result


if __name__ == "__main__":
  main()
