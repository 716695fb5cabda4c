"""Alpaca-format instruction data: JSON lists or JSON Lines of `{instruction, input, output}` records."""

import json
import os
import pathlib

from clclm_jax.data.errors import DataError

ALPACA_KEYS = ("instruction", "input", "output")


def _decode(path: pathlib.Path) -> str:
  try:
    text = path.read_bytes().decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(path, None, f"byte {e.start} is not UTF-8", "re-encode the file as UTF-8") from None
  if not text.strip():
    raise DataError(path, None, "the file is empty", "point at a file holding at least one record")
  return text


def read_json_records(path: str | os.PathLike, keys: tuple[str, ...] = ALPACA_KEYS) -> list[dict]:
  """Records from a JSON list or JSON Lines file, each checked to be an object with string `keys`."""
  path = pathlib.Path(path)
  text = _decode(path)
  records, start = None, text.lstrip()[:1]
  if start in ("[", "{"):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      if start == "[" or e.msg != "Extra data":  # "Extra data" after a first object: JSON Lines, read below
        raise DataError(path, None, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
                        "fix the JSON syntax there") from None
  if isinstance(records, dict):
    if not all(k in records for k in keys):
      lists = [k for k, v in records.items() if isinstance(v, list)]
      raise DataError(path, None, f"is one JSON object (keys {sorted(records)[:5]}), not a list of records",
                      f"write the list under {lists[0]!r} alone" if lists else
                      f"write a list of objects with keys {keys}, `[{{...}}, {{...}}]`, or one object per line")
    records = [records]  # a single record
  if records is None:
    records = []
    for lineno, line in enumerate(text.splitlines()):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise DataError(path, len(records), f"malformed JSON on line {lineno + 1}: {e.msg}",
                        "write one JSON object per line") from None
  for i, record in enumerate(records):
    if not isinstance(record, dict):
      raise DataError(path, i, f"is a {type(record).__name__}, not an object", f"write objects with keys {keys}")
    missing = [k for k in keys if k not in record]
    if missing:
      raise DataError(path, i, f"missing keys {missing}", f"give every record the keys {keys}")
    wrong = [k for k in keys if not isinstance(record[k], str)]
    if wrong:
      raise DataError(path, i, f"keys {wrong} are not strings", "store instruction, input and output as strings")
  return records


def read_alpaca(path: str | os.PathLike) -> list[dict[str, str]]:
  """Alpaca records `{instruction, input, output}` (`input` may be empty)."""
  return [{k: r[k] for k in ALPACA_KEYS} for r in read_json_records(path)]


def read_seed_tasks(path: str | os.PathLike) -> list[dict[str, str]]:
  """Stanford Alpaca's `seed_tasks.jsonl`, flattened to Alpaca records from each task's first instance."""
  path = pathlib.Path(path)
  out = []
  for i, task in enumerate(read_json_records(path, keys=("instruction",))):
    instances = task.get("instances")
    if not instances or not isinstance(instances[0], dict) or not {"input", "output"} <= instances[0].keys():
      raise DataError(path, i, "has no instances[0] with input and output", "give each task one instance")
    out.append({"instruction": task["instruction"], "input": instances[0]["input"], "output": instances[0]["output"]})
  return out
