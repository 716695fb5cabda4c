"""Where the shared datasets live: `CLCLM_DATA`, else `../shared/data` next to the repository."""

import os
import pathlib

_HINT = "set CLCLM_DATA to the folder holding ml-100k/, tallrec/, amazon-beauty-5core/, instruct/"


def data_root() -> pathlib.Path:
  """The data root; raises FileNotFoundError with the fix when it is missing."""
  env = os.environ.get("CLCLM_DATA")
  root = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
  if not root.is_dir():
    raise FileNotFoundError(f"data root {root} does not exist: {_HINT}")
  return root


def data_path(*parts: str) -> pathlib.Path:
  """A file under the data root, with a clear error if it is absent."""
  p = data_root().joinpath(*parts)
  if not p.exists():
    raise FileNotFoundError(f"{p} is missing: {_HINT}")
  return p
