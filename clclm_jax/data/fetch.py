"""Download the built-in datasets from their public sources, each file checked against a SHA-256 kept here.

  python -m clclm_jax.data fetch [--only movie,book,beauty,instruct] [--out DIR] [--mirror URL]

The data is not shipped with the code (MovieLens and Alpaca forbid redistribution), so a fresh machine gets it
from where the team's copy (shared/data, see its README.md) came from: GroupLens' ml-100k.zip and raw files of
fixed GitHub commits. `--mirror URL` reads the same files by their place in the data folder instead
(`URL/ml-100k/u.data`, `URL/tallrec/book/test.json`, ...), e.g. from an internal web server.

Every file is written whole (a `.part` file, renamed once its sum is right), a broken download goes on from the
`.part` file's size with an HTTP Range request (from scratch when the server ignores Range), and a file already
there with the right sum is not downloaded again.
"""

import csv
import hashlib
import html
import http.client
import json
import os
import pathlib
import re
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence

from tqdm import tqdm

from clclm_jax.data import paths
from clclm_jax.data.errors import DataError

GITHUB_RAW = "https://raw.githubusercontent.com"
MOVIELENS_ZIP = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
TIMEOUT_S = 30
RETRIES = 3  # resumed attempts after a connection breaks off in the middle of a file
CHUNK = 1 << 16

NETWORK_FIX = ("check the network (or pass --mirror URL), or set CLCLM_DATA to a folder that already holds "
               "ml-100k/, tallrec/, amazon-beauty-5core/, instruct/ (e.g. a copy of shared/data)")


class FetchError(DataError):
  """A download that failed or gave the wrong bytes; a DataError so that the command lines print it as one line."""

  def __init__(self, where: str | os.PathLike, problem: str, fix: str):
    super().__init__(where, None, problem, fix)


# Copied from shared/data/SHA256SUMS: the files as the team checked them (see shared/data/README.md).
SHA256 = {
    "ml-100k/README": "13bd9f37d8bf12062b8033d268dc3be0893547735336e64df3a3f4eb4b8a9729",
    "ml-100k/u.data": "f30990191c9ccfc53952ae5d6e29c78a3e35d7237d3127a7392ae534facea542",
    "ml-100k/u.item": "7a6503febd0a706078e27370f207d1d6acefbdb89d2b6ce25b02a03621e81c88",
    "tallrec/movie/valid.json": "d4aa0c005868aef9b8a85583db946662a2be9c2e0e09f810fe3a7ad31d89274f",
    "tallrec/movie/test.json": "474e02cde467c8c7001168a4a390a581217edcd8f4726c39aa88c9aa37c54d5e",
    "tallrec/book/valid.json": "484165aefc7941fd9f19cc9f42144832d5cee7424b15dc661b753d7705769aa2",
    "tallrec/book/test.json": "28ab5fe8b28f4094b7fa5b0d46acdbb3984f55e728d04f78e3ea42e7c2bf102b",
    "amazon-beauty-5core/sequential_data.txt": "f85a84ab47d70e82bf0e7301804270af10fb51e127ab8f0885697d593f6f6d43",
    "amazon-beauty-5core/datamaps.json": "715ab04838ff1ba21238475ed453a89e8c30aa6214b904d27a79e4168fc7b612",
    "amazon-beauty-5core/source_products_lookup.csv":
        "65133eca0615999df67fc5b26a93a7da762e53e613a083fd6b9e37174896d128",
    "amazon-beauty-5core/source_item_id_to_int.json":
        "3d1a1d362c7daeddf616057fae8fa24af9d70902fdaf4631852231a9953afa50",
    "amazon-beauty-5core/item_titles.tsv": "3becdf63c1ca0c514ba391dd942ec5d512d48372bf0da9c9b0d8e6744e04003b",
    "instruct/alpaca_data_1k.json": "308ff96375b5a08f7ebf0c763aaf02f7436beb974a28f868eba9823919e6b74c",
    "instruct/alpaca_small.json": "da78d2d54637d8b7e210d1db495da09c0de3ac21067aefafef5da58586b45ce3",
    "instruct/code_alpaca_2k.json": "9cb7352683bd2f530ce81eff7f8d58ccbe1a4bdf28afebbe9f80ec687256066d",
    "instruct/seed_tasks.jsonl": "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
}

# What the built-in configs, the benchmarks and the tests read, by --only name. ml-100k/README comes along for
# GroupLens' terms of use; movie's TALLRec files are what benchmarks/forward.py and the tests compare with.
# Left out: tallrec/movie/train_regenerated.json (made locally, no public copy; the code rebuilds the movie
# splits from u.data), bookcrossing/ and the sports/toys sequences (no built-in config reads them).
GROUPS = {
    "movie": ("ml-100k/u.data", "ml-100k/u.item", "ml-100k/README",
              "tallrec/movie/valid.json", "tallrec/movie/test.json"),
    "book": ("tallrec/book/valid.json", "tallrec/book/test.json"),
    "beauty": ("amazon-beauty-5core/sequential_data.txt", "amazon-beauty-5core/datamaps.json",
               "amazon-beauty-5core/source_products_lookup.csv", "amazon-beauty-5core/source_item_id_to_int.json",
               "amazon-beauty-5core/item_titles.tsv"),
    "instruct": ("instruct/alpaca_data_1k.json", "instruct/alpaca_small.json", "instruct/code_alpaca_2k.json",
                 "instruct/seed_tasks.jsonl"),
}

# Snapshot commits from shared/data/README.md, which gives 12-hex prefixes; the full ids are those prefixes
# resolved in the repositories' history (each file's git blob id there matches the README's).
_TALLREC = ("SAI990323/TALLRec", "c1db29ce6501bce32cc8c3e343c4eb14155beeb1")
_P5_BEAUTY = ("Wenyueh/LLM-RecSys-ID", "2200ad9fef647ef755c01d6d7e5c5de3082606c5")
_LLMSEQ = ("dh-r/LLM-Sequential-Recommendation", "6464b39064f369b251580c63edbf635de0934101")
GITHUB = {
    "tallrec/movie/valid.json": (*_TALLREC, "data/movie/valid.json"),
    "tallrec/movie/test.json": (*_TALLREC, "data/movie/test.json"),
    "tallrec/book/valid.json": (*_TALLREC, "data/book/valid.json"),
    "tallrec/book/test.json": (*_TALLREC, "data/book/test.json"),
    "amazon-beauty-5core/sequential_data.txt": (*_P5_BEAUTY, "data/beauty/sequential_data.txt"),
    "amazon-beauty-5core/datamaps.json": (*_P5_BEAUTY, "data/beauty/datamaps.json"),
    "amazon-beauty-5core/source_products_lookup.csv": (*_LLMSEQ, "beauty/products_lookup.csv"),
    "amazon-beauty-5core/source_item_id_to_int.json": (*_LLMSEQ, "beauty/item_id_to_int.json"),
    "instruct/seed_tasks.jsonl": ("tatsu-lab/stanford_alpaca", "761dc5bfbdeeffa89b8bff5d038781a4055f796a",
                                  "seed_tasks.jsonl"),
    "instruct/alpaca_data_1k.json": ("wujindou/BLOOM-LORA", "11c488c814c650c52e4ebbe1e284085e3a0a5c2d",
                                     "data/alpaca_data_1k.json"),
    "instruct/alpaca_small.json": ("Antelofski/alpaca-lora", "4247f486ca5751371a19fcec5061da437344824f",
                                   "alpaca_small.json"),
    "instruct/code_alpaca_2k.json": ("sahil280114/codealpaca", "2f78ddc5c682ed6738ad092bbbfa59ba915afcb0",
                                     "data/code_alpaca_2k.json"),
}


def beauty_titles(root: pathlib.Path) -> bytes:
  """item_titles.tsv (`p5_item_id<TAB>asin<TAB>title`, P5 id order) from datamaps.json and dh-r's two files,
  joined on ASIN and cleaned as shared/data/README.md describes; no public copy of the joined file exists."""
  beauty = root / "amazon-beauty-5core"
  with open(beauty / "source_products_lookup.csv", encoding="utf-8", newline="") as f:
    names = {int(row[1]): row[2] for row in list(csv.reader(f))[1:]}
  gid_of_asin = json.loads((beauty / "source_item_id_to_int.json").read_text(encoding="utf-8"))
  id2item = json.loads((beauty / "datamaps.json").read_text(encoding="utf-8"))["id2item"]
  lines = ["p5_item_id\tasin\ttitle"]
  for i in range(1, len(id2item) + 1):
    asin = id2item[str(i)]
    title = html.unescape(names.get(gid_of_asin.get(asin), ""))
    title = re.sub(r"\s+", " ", title.replace("\\n", " ").replace("\\t", " ")).strip()  # literal \n, \t too
    lines.append(f"{i}\t{asin}\t{title}")
  return ("\n".join(lines) + "\n").encode("utf-8")


DERIVED = {"amazon-beauty-5core/item_titles.tsv": beauty_titles}


def parse_groups(text: str | Iterable[str]) -> list[str]:
  """`movie,book` (or a list) as group names; ValueError naming the choices for an unknown one."""
  names = [g.strip() for g in (text.split(",") if isinstance(text, str) else text) if g.strip()]
  unknown = [g for g in names if g not in GROUPS]
  if unknown or not names:
    raise ValueError(f"unknown data group(s) {unknown or names}: choose from {','.join(GROUPS)}")
  return names


def files_of(groups: Sequence[str]) -> list[str]:
  """The data-folder paths `groups` need, each once, in group order."""
  return list(dict.fromkeys(rel for g in parse_groups(groups) for rel in GROUPS[g]))


def sha256_of(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()


def is_good(root: pathlib.Path, rel: str) -> bool:
  return (root / rel).is_file() and sha256_of(root / rel) == SHA256[rel]


def missing(root: pathlib.Path, groups: Sequence[str]) -> list[str]:
  """Files of `groups` absent under `root` (only looked for: a folder the user gave is taken as it is)."""
  return [rel for rel in files_of(groups) if not (root / rel).is_file()]


def _say(text: str) -> None:
  tqdm.write(text, file=sys.stderr)


def _write_whole(dest: pathlib.Path, data: bytes) -> None:
  """`data` into `dest` through a temporary sibling, so that `dest` is never half written."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.with_name(f".{dest.name}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, dest)


class _BrokenOff(Exception):
  """The connection ended before the whole body came; the `.part` file keeps what did."""


def _get(url: str, part: pathlib.Path, progress: bool) -> None:
  """Append the rest of `url` to `part` (a Range request from its size), or write it whole when the server
  ignores Range."""
  offset = part.stat().st_size if part.exists() else 0
  request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
  try:
    response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
  except urllib.error.HTTPError as e:
    if e.code == 416 and offset:  # the partial file is as long as the file or longer: not a prefix, start over
      part.unlink()
      return _get(url, part, progress)
    raise FetchError(url, f"HTTP {e.code} {e.reason}", NETWORK_FIX) from None
  except (urllib.error.URLError, OSError) as e:
    raise FetchError(url, f"cannot download ({getattr(e, 'reason', e)})", NETWORK_FIX) from None
  with response:
    resumed = offset and response.status == 206 and \
        response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
    if not resumed:
      offset = 0  # 200: the server sent the whole file again
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length else None
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
               leave=False, disable=None if progress else True)
    try:
      with open(part, "ab" if resumed else "wb") as f, bar:
        while chunk := response.read(CHUNK):
          f.write(chunk)
          bar.update(len(chunk))
    except (http.client.HTTPException, OSError) as e:  # IncompleteRead, reset, timeout
      raise _BrokenOff(f"{type(e).__name__}") from None
  if total is not None and part.stat().st_size != total:
    raise _BrokenOff(f"{part.stat().st_size} of {total} bytes")


def download(url: str, dest: pathlib.Path, sha256: str | None, progress: bool = True) -> None:
  """`url` into `dest`, whole and (with `sha256`) verified; a `.part` file from an earlier try is continued."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + ".part")
  for fresh_try in (False, True):
    continued = part.exists()
    for attempt in range(RETRIES + 1):
      try:
        _get(url, part, progress)
        break
      except _BrokenOff as e:
        continued = True  # what is appended next may not fit what came before: a wrong sum gets a fresh try
        if attempt == RETRIES:
          raise FetchError(dest, f"the download from {url} broke off {RETRIES + 1} times ({e})",
                           "run the fetch again: it goes on from the partial file") from None
        _say(f"{dest.name}: connection broke off ({e}); resuming")
    got = sha256_of(part) if sha256 else None
    if got == sha256:
      os.replace(part, dest)
      return
    part.unlink()
    dest.unlink(missing_ok=True)
    if continued and not fresh_try:  # the old partial file may have been bad: one more try from the start
      _say(f"{dest.name}: sha256 wrong after resuming; downloading it again whole")
      continue
    raise FetchError(dest, f"sha256 of the file from {url} is {got[:16]}..., not the expected {sha256[:16]}... "
                     "(file removed)", "run the fetch again; if it still differs the source changed: use "
                     "--mirror with a verified copy, or set CLCLM_DATA to one")


def _extract_movielens(members: list[str], out: pathlib.Path, zip_url: str, progress: bool) -> None:
  """GroupLens ships ml-100k as one zip (members `ml-100k/u.data`, ...): download it once, keep the members
  asked for (each verified), then remove the zip."""
  archive = out / ".ml-100k.zip"
  if not archive.is_file():
    download(zip_url, archive, None, progress)
  try:
    with zipfile.ZipFile(archive) as z:
      for rel in members:
        try:
          data = z.read(rel)
        except KeyError:
          raise FetchError(zip_url, f"has no member {rel}", "use GroupLens' ml-100k.zip") from None
        got = hashlib.sha256(data).hexdigest()
        if got != SHA256[rel]:
          (out / rel).unlink(missing_ok=True)
          raise FetchError(out / rel, f"sha256 of the member in {zip_url} is {got[:16]}..., not the expected "
                           f"{SHA256[rel][:16]}... (file removed)", "run the fetch again; if it still differs "
                           "use --mirror with a verified copy, or set CLCLM_DATA to one")
        _write_whole(out / rel, data)
  except zipfile.BadZipFile:
    raise FetchError(zip_url, "is not a readable zip (removed)", "run the fetch again") from None
  finally:
    archive.unlink(missing_ok=True)  # a bad zip is not reused; a good one is no longer needed


def fetch(groups: Sequence[str], out: str | os.PathLike, mirror: str | None = None,
          progress: bool = True) -> dict[str, str]:
  """Make `out` hold the files of `groups` with the right sums. Returns what happened to each file:
  "present", "downloaded", "extracted" (from ml-100k.zip) or "derived" (joined from downloaded files)."""
  out = pathlib.Path(out).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  wanted = files_of(groups)
  done = {}
  todo = []
  for rel in wanted:
    if (out / rel).is_file():
      if sha256_of(out / rel) == SHA256[rel]:
        done[rel] = "present"
        continue
      _say(f"{out / rel}: sha256 differs from the expected one; downloading it again")
    todo.append(rel)
  if mirror:  # the mirror has every file, the derived ones too, at its data-folder path
    for rel in todo:
      download(f"{mirror.rstrip('/')}/{rel}", out / rel, SHA256[rel], progress)
      done[rel] = "downloaded"
    return {rel: done[rel] for rel in wanted}
  zipped = [rel for rel in todo if rel.startswith("ml-100k/")]
  if zipped:
    _extract_movielens(zipped, out, MOVIELENS_ZIP, progress)
    done.update(dict.fromkeys(zipped, "extracted"))
  for rel in todo:
    if rel in GITHUB:
      repo, commit, path = GITHUB[rel]
      download(f"{GITHUB_RAW}/{repo}/{commit}/{path}", out / rel, SHA256[rel], progress)
      done[rel] = "downloaded"
  for rel in todo:  # after the downloads: a derived file is made from them
    if rel in DERIVED:
      data = DERIVED[rel](out)
      got = hashlib.sha256(data).hexdigest()
      if got != SHA256[rel]:
        raise FetchError(out / rel, f"sha256 of the file made from its sources is {got[:16]}..., not the expected "
                         f"{SHA256[rel][:16]}...", "use --mirror with a verified copy, or set CLCLM_DATA to one")
      _write_whole(out / rel, data)
      done[rel] = "derived"
  return {rel: done[rel] for rel in wanted}


def ensure_data(groups: Sequence[str], progress: bool = True) -> pathlib.Path:
  """The data root, holding the files of `groups`. A folder found by `paths.find_data_root` (CLCLM_DATA or
  ../shared/data) is only checked for missing files; with none, the files are fetched into the download cache
  (`paths.cache_data()`), with one line saying so, from CLCLM_MIRROR when set (a `--mirror` for train.py)."""
  root = paths.find_data_root()
  cache = paths.cache_data()
  if root is None and os.environ.get("CLCLM_DATA"):  # the user named a folder: do not fill another one
    raise FetchError(os.environ["CLCLM_DATA"], "CLCLM_DATA names no folder",
                     f"set CLCLM_DATA to the data folder, or fetch into it: python -m clclm_jax.data fetch "
                     f"--only {','.join(parse_groups(groups))} --out {os.environ['CLCLM_DATA']}")
  if root is not None and root != cache:
    absent = missing(root, groups)
    if absent:
      raise FetchError(root, f"is missing {len(absent)} file(s): {', '.join(absent)}",
                       f"run python -m clclm_jax.data fetch --only {','.join(parse_groups(groups))} --out {root}, "
                       "or set CLCLM_DATA to a complete copy")
    return root
  if not all(is_good(cache, rel) for rel in files_of(groups)):
    print(f"clclm_jax: no data folder (CLCLM_DATA unset, {paths.shared_data()} missing): downloading "
          f"{','.join(parse_groups(groups))} into {cache}", file=sys.stderr)
    fetch(groups, cache, mirror=os.environ.get("CLCLM_MIRROR") or None, progress=progress)
  return cache
