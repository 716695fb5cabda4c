"""Bad input: each case names the file, the record and the fix, and leaves nothing on disk."""

import json

import pytest

from clclm_jax.data import instruct, prompts, tallrec
from clclm_jax.data.errors import DataError

INSTR = prompts.instruction("movie")
GOOD_INPUT = 'User Preference: "A (1990)"\nUser Unpreference: \nWhether the user will like the target movie "B (1991)"?'


def _tallrec(tmp_path, content: str | bytes):
  path = tmp_path / "bad.json"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  return tallrec.read_tallrec(path, "movie", tallrec.ItemIds())


def _records(*records) -> str:
  return json.dumps(list(records), indent=4)


@pytest.mark.parametrize("content,message", [
    ("", r"bad.json: the file is empty; fix: point at a file"),
    ("[\n{\"instruction\": 1,}\n]", r"bad.json: malformed JSON at line 2 column \d+: .*; fix: fix the JSON syntax"),
    (b"[\xff]", r"bad.json: byte 1 is not UTF-8; fix: re-encode"),
    (_records({"instruction": INSTR, "input": GOOD_INPUT}),
     r"bad.json record 0: missing keys \['output'\]; fix: give every record the keys"),
    (_records({"instruction": INSTR, "input": GOOD_INPUT, "output": "Yes."}, [1]),
     r"bad.json record 1: is a list, not an object"),
    (_records({"instruction": INSTR, "input": GOOD_INPUT, "output": "Maybe."}),
     r"bad.json record 0: output 'Maybe.' is not 'Yes.' or 'No.'; fix: label every record Yes. or No."),
    (_records({"instruction": INSTR, "input": GOOD_INPUT, "output": 1}),
     r"bad.json record 0: keys \['output'\] are not strings"),
    (_records({"instruction": INSTR, "input": "User Preference: A\nWhat?", "output": "No."}),
     r"bad.json record 0: input is not `User Preference: .*; fix: render inputs with prompts.render_tallrec"),
    (_records({"instruction": prompts.instruction("book"), "input": GOOD_INPUT, "output": "No."}),
     r"bad.json record 0: instruction is not TALLRec's movie instruction"),
])
def test_bad_tallrec_json(tmp_path, content, message):
  with pytest.raises(DataError, match=message):
    _tallrec(tmp_path, content)


def test_bad_jsonl_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"instruction": "i", "input": "", "output": "o"}\n{"instruction": \n')
  with pytest.raises(DataError, match=r"x.jsonl record 1: malformed JSON on line 2"):
    instruct.read_alpaca(path)


def test_seed_task_without_instances(tmp_path):
  path = tmp_path / "seed.jsonl"
  path.write_text('{"instruction": "i", "instances": []}\n')
  with pytest.raises(DataError, match=r"seed.jsonl record 0: has no instances\[0\] with input and output"):
    instruct.read_seed_tasks(path)


def _movielens(folder, data: str, item: bytes = "1|A (1990)|01-Jan-1990||url|0\n".encode()):
  (folder / "u.data").write_text(data)
  (folder / "u.item").write_bytes(item)


@pytest.mark.parametrize("data,item,message", [
    ("1\t2\t5\t881250949\n", None, r"u.data record 0: unknown item id 2; fix: use the u.item that ships with u.data"),
    ("1\t1\t5\n", None, r"u.data record 0: is not `user<TAB>item<TAB>rating<TAB>timestamp`"),
    ("1\t1\t5\t881250949\n", b"x|y\n", r"u.item record 0: is not `id\|title\|release date"),
    ("1\t1\t5\t88125\xe99\n", None, r"u.data: byte 11 is not ascii; fix: use the original ascii file"),
])
def test_bad_movielens(tmp_path, data, item, message):
  _movielens(tmp_path, data, *([item] if item else []))
  out = tmp_path / "out"
  with pytest.raises(DataError, match=message):
    tallrec.build_tallrec("movie", tmp_path, out)
  assert not out.exists()


def test_bad_bookcrossing(tmp_path):
  (tmp_path / "BX-Books.csv").write_bytes(b'"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication"\r\n"1";"T"\r\n')
  (tmp_path / "BX-Book-Ratings.csv").write_bytes(b'"User-ID";"ISBN";"Book-Rating"\r\n')
  with pytest.raises(DataError, match=r"BX-Books.csv record 0: has 2 fields, the header has 4"):
    tallrec.build_tallrec("book", tmp_path, tmp_path / "out")
  (tmp_path / "BX-Books.csv").write_bytes(b'"ISBN";"Title"\r\n')
  with pytest.raises(DataError, match=r"BX-Books.csv: header lacks columns \['Book-Title', 'Book-Author'"):
    tallrec.build_tallrec("book", tmp_path, tmp_path / "out")
  assert not (tmp_path / "out").exists()
