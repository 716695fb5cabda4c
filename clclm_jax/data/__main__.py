"""Command line: `python -m clclm_jax.data tallrec --dataset movie --raw DIR --out DIR`."""

import argparse
import sys

from clclm_jax.data import tallrec
from clclm_jax.data.errors import DataError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clclm_jax.data")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("tallrec", help="raw MovieLens-100K / Book-Crossing -> TALLRec train/valid/test.json")
  p.add_argument("--dataset", choices=tallrec.DOMAINS, required=True)
  p.add_argument("--raw", required=True, help="folder with u.data + u.item, or BX-Books.csv + BX-Book-Ratings.csv")
  p.add_argument("--out", required=True, help="folder to write train.json, valid.json, test.json")
  p.add_argument("--seed", type=int, default=42, help="book only: user split and per-user shuffles")
  args = parser.parse_args(argv)
  try:
    counts = tallrec.build_tallrec(args.dataset, args.raw, args.out, seed=args.seed)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(" ".join(f"{name}={n}" for name, n in counts.items()), "->", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
