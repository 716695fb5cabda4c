"""Where the datasets live: `CLCLM_DATA`, else `../shared/data` next to the repository, else the download cache
(`$CLCLM_CACHE/data`, default `~/.cache/clclm_jax/data`) that `python -m clclm_jax.data fetch` fills."""

import os
import pathlib

_HINT = ("set CLCLM_DATA to the folder holding ml-100k/, tallrec/, amazon-beauty-5core/, instruct/, "
         "or download them with `python -m clclm_jax.data fetch`")


def shared_data() -> pathlib.Path:
  """The team's copy next to the repository: `../shared/data`."""
  return pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"


def cache_data() -> pathlib.Path:
  """Where `fetch` puts the data by default. Same rule as `clclm_jax.model.loading.cache_root` ($CLCLM_CACHE,
  else ~/.cache/clclm_jax), written out here so that the data package does not import the model package."""
  return pathlib.Path(os.environ.get("CLCLM_CACHE") or "~/.cache/clclm_jax").expanduser() / "data"


def find_data_root() -> pathlib.Path | None:
  """The first of CLCLM_DATA (when set, it is the answer even if absent), ../shared/data, the download cache
  that exists; None when none does."""
  env = os.environ.get("CLCLM_DATA")
  if env:
    return pathlib.Path(env) if pathlib.Path(env).is_dir() else None
  for root in (shared_data(), cache_data()):
    if root.is_dir():
      return root
  return None


def data_root() -> pathlib.Path:
  """The data root; raises FileNotFoundError with the fix when it is missing."""
  root = find_data_root()
  if root is None:
    env = os.environ.get("CLCLM_DATA")
    why = f"CLCLM_DATA={env} does not exist" if env else f"neither {shared_data()} nor {cache_data()} exists"
    raise FileNotFoundError(f"no data root ({why}): {_HINT}")
  return root


def data_path(*parts: str) -> pathlib.Path:
  """A file under the data root, with a clear error if it is absent."""
  p = data_root().joinpath(*parts)
  if not p.exists():
    raise FileNotFoundError(f"{p} is missing: {_HINT}")
  return p
