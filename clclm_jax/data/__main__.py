"""Command line:

  python -m clclm_jax.data tallrec --dataset movie --raw DIR --out DIR
  python -m clclm_jax.data fetch [--only movie,book,beauty,instruct] [--out DIR] [--mirror URL]
"""

import argparse
import os
import sys
from collections import Counter

from clclm_jax.data import fetch, paths, tallrec
from clclm_jax.data.errors import DataError


def _groups(text: str) -> list[str]:
  try:
    return fetch.parse_groups(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clclm_jax.data")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("tallrec", help="raw MovieLens-100K / Book-Crossing -> TALLRec train/valid/test.json")
  p.add_argument("--dataset", choices=tallrec.DOMAINS, required=True)
  p.add_argument("--raw", required=True, help="folder with u.data + u.item, or BX-Books.csv + BX-Book-Ratings.csv")
  p.add_argument("--out", required=True, help="folder to write train.json, valid.json, test.json")
  p.add_argument("--seed", type=int, default=42, help="book only: user split and per-user shuffles")
  f = sub.add_parser("fetch", help="download the built-in datasets from their public sources, checked by sha256")
  f.add_argument("--only", type=_groups, default=list(fetch.GROUPS),
                 help=f"comma-separated groups (default: all of {','.join(fetch.GROUPS)})")
  # Not ../shared/data: that copy is the team's, read-only; the cache is where data_root() looks last.
  f.add_argument("--out", default=os.environ.get("CLCLM_DATA") or str(paths.cache_data()),
                 help="data folder to fill (default: $CLCLM_DATA, else %(default)s)")
  f.add_argument("--mirror", help="base URL serving the data folder's layout (URL/ml-100k/u.data, ...)")
  f.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  try:
    if args.command == "fetch":
      try:
        done = fetch.fetch(args.only, args.out, mirror=args.mirror, progress=not args.quiet)
      except OSError as e:  # e.g. --out not writable: the OS's message names the path
        print(f"error: {e}; fix: choose another --out", file=sys.stderr)
        return 1
      print(" ".join(f"{how}={n}" for how, n in Counter(done.values()).items()), "->", args.out)
      return 0
    counts = tallrec.build_tallrec(args.dataset, args.raw, args.out, seed=args.seed)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(" ".join(f"{name}={n}" for name, n in counts.items()), "->", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
