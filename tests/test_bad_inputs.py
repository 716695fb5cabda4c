"""Issue 52, the inputs a hostile user gives: each is stopped (or warned about) in one line naming the file, the
record or the field, and the fix, before anything is lost."""

import dataclasses
import json
import os
import pathlib
import signal
import time

import pytest

from clclm_jax.data import configured, fused, instruct, pipeline, prompts, tallrec, tokenize
from clclm_jax.data.errors import DataError
from clclm_jax.data.records import Catalogue, Interaction, Item
from clclm_jax.model import build, loading
from clclm_jax.model.config import presets
from clclm_jax.model.errors import ModelError
from clclm_jax.train import checkpoint, cli, evaluate, loop, runconfig, sharding, trainer
from clclm_jax.train.errors import ConfigError
from configs import tiny
from test_train_loop import _files_config, _tallrec_files

ROOT = pathlib.Path(__file__).parents[1]


def _tiny(**train):
  c = tiny.get_config()
  c.data.test_size, c.train.max_steps, c.train.eval_every = 0, 2, 2
  for k, v in train.items():
    c.train[k] = v
  return c


# --- 15: a JSON object instead of a list -------------------------------------------------------------------------

def test_a_json_object_instead_of_a_list_says_what_was_found_and_what_is_expected(tmp_path):
  record = {"instruction": "i", "input": "", "output": "o"}
  path = tmp_path / "data.json"
  path.write_text(json.dumps({"data": [record, record]}, indent=2))
  with pytest.raises(DataError, match=r"^\S*data.json: is one JSON object \(keys \['data'\]\), not a list of "
                                      r"records; fix: write the list under 'data' alone$"):
    instruct.read_alpaca(path)
  path.write_text(json.dumps({"name": "x", "size": 2}, indent=2))
  with pytest.raises(DataError, match=r"data.json: is one JSON object \(keys \['name', 'size'\]\), not a list of "
                                      r"records; fix: write a list of objects with keys \('instruction', 'input', "
                                      r"'output'\), `\[\{...\}, \{...\}\]`, or one object per line$"):
    instruct.read_alpaca(path)
  path.write_text(json.dumps(record, indent=2))  # one record alone, pretty-printed, is a record
  assert instruct.read_alpaca(path) == [record]
  path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")  # JSON Lines still read
  assert instruct.read_alpaca(path) == [record, record]


# --- 14 and 9: prompt length errors name the file and record; huge records fail fast; the model's context -------

def _file(tmp_path, titles: list[str], name="bad.json") -> pathlib.Path:
  catalogue = Catalogue([Item(i + 1, t) for i, t in enumerate(titles)] + [Item(99, "Old (1990)")])
  xs = [Interaction(0, (99,), (True,), i + 1, i % 2) for i in range(len(titles))]
  path = tmp_path / name
  path.write_text(tallrec.dumps_tallrec([prompts.tallrec_record(x, catalogue, "movie") for x in xs]))
  return path


def test_prompt_length_errors_name_the_file_and_the_records_index_in_it(tmp_path):
  path = _file(tmp_path, ["A (1991)", "B (1992)", "C (1993)", "D (1994)", "T" * 600, "F (1995)"])
  ids, tok = tallrec.ItemIds(), build.byte_tokenizer()
  xs = tallrec.read_tallrec(path, "movie", ids)
  # a shuffled subset, as evaluation scores: position 0 is record 4 of the file
  examples = pipeline.tallrec_examples([xs[4], xs[1]], ids.catalogue(), "movie", tok, cutoff_len=512)
  with pytest.raises(DataError, match=r"^\S*bad.json record 4: even with no history the prompt is too long \(\d+ "
                                      r"tokens > cutoff_len 512\); fix: raise cutoff_len"):
    examples[0]
  assert len(examples[1]["tokens"]) < 512
  spec = fused.PromptSpec("movie", "<s>", 256, 0, cutoff_len=512)
  with pytest.raises(DataError, match=r"bad.json record 4: even with no history the prompt is too long"):
    fused.encode_fused(tok, xs[4], ids.catalogue(), spec, 0)
  # 9: the prompt fits cutoff_len but not the model's context
  long = pipeline.tallrec_examples([xs[1], xs[4]], ids.catalogue(), "movie", tok, cutoff_len=2048, context=600)
  assert long[0]["index"] == 0
  with pytest.raises(DataError, match=r"bad.json record 4: \d+ tokens, more than the model's context of 600 "
                                      r"\(max_position_embeddings\); fix: set data.cutoff_len to 600 or less"):
    long[1]
  with pytest.raises(DataError, match=r"bad.json record 4: \d+ tokens, more than the model's context of 600"):
    fused.encode_fused(tok, xs[4], ids.catalogue(), dataclasses.replace(spec, cutoff_len=2048, context=600), 0)


def test_training_refuses_a_prompt_beyond_the_models_context_naming_its_file_and_record(tmp_path, data_root,
                                                                                      monkeypatch):
  monkeypatch.setitem(presets, "tiny", dataclasses.replace(presets["tiny"], max_position_embeddings=300))
  with pytest.raises(DataError, match=r"tallrec/book/valid.json record \d+: \d+ tokens, more than the model's "
                                      r"context of 300 \(max_position_embeddings\); fix: set data.cutoff_len to 300"):
    loop.train(_tiny(), tmp_path / "run")
  assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_huge_record_fails_fast_or_loses_its_history_fast(tmp_path):
  """A few-MB title: the history-dropping loop tokenises no prompt that cannot fit (it tokenised each of them
  twice, over a minute here, six for a 50 MB line)."""
  tok = build.byte_tokenizer()
  t0 = time.time()
  path = _file(tmp_path, ["A (1991)", "x" * 3_000_000])
  ids = tallrec.ItemIds()
  xs = tallrec.read_tallrec(path, "movie", ids)
  with pytest.raises(DataError, match=r"bad.json record 1: even with no history the prompt is too long \(3000\d+ "
                                      r"characters, more than cutoff_len 1024 tokens hold\)"):
    tokenize.encode_interaction(tok, xs[1], ids.catalogue(), "movie", cutoff_len=1024)
  huge = Catalogue([Item(1, "A (1991)"), Item(2, "x" * 3_000_000), Item(3, "B (1992)")])
  newest_is_huge = Interaction(0, (1, 3, 2), (True, False, True), 1, 1)
  enc = tokenize.encode_interaction(tok, newest_is_huge, huge, "movie", cutoff_len=1024)
  assert len(enc) == len(tokenize.encode_interaction(tok, newest_is_huge.drop_oldest(3), huge, "movie"))
  assert time.time() - t0 < 5, f"{time.time() - t0:.1f} s"


# --- 8: repeated records, test records in the training file ------------------------------------------------------

def _records(path):
  return json.loads(path.read_text())


def test_repeats_are_counted_and_test_records_in_train_stop_the_run(tmp_path):
  files = _tallrec_files(tmp_path)
  train, test = _records(files["train"]), _records(files["test"])
  files["train"].write_text(json.dumps(train + [train[2], train[5]], indent=4))  # records 24, 25 repeat 2, 5
  files["test"].write_text(json.dumps([train[3]] + test[1:], indent=4))  # test record 0 is train record 3
  c, said = _files_config(files), []
  sp = configured.rec_splits(c)
  with pytest.raises(ConfigError, match=r"^config.data.files.test='\S*test.json' holds 1 training records \(test "
                                        r"record = train record: 0 = 3\): the test AUC scores prompts the model "
                                        r"trained on; remove them, or set data.allow_test_in_train=True$"):
    configured.check_splits(c, sp, log=said.append)
  assert said == [f"warning: config.data.files.train='{files['train']}' repeats 2 records (record = earlier record: "
                  "24 = 2, 25 = 5): each weighs twice (remove the repeats)"]
  c.data.allow_test_in_train = True
  configured.check_splits(c, sp, log=said.append)
  assert said[-1].startswith(f"warning: config.data.files.test='{files['test']}' holds 1 training records (test "
                             "record = train record: 0 = 3)")
  c.data.allow_test_in_train = False
  with pytest.raises(ConfigError, match=r"set data.allow_test_in_train=True"):  # read on the training path
    loop.train(c, tmp_path / "run")
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_built_in_splits_are_checked_too(data_root):
  for domain in ("movie", "book"):
    c, said = tiny.get_config(), []
    c.data.domain = domain
    configured.check_splits(c, configured.rec_splits(c), log=said.append)
    assert said == ([] if domain == "movie" else
                    [f"warning: the built-in book test split (records of {data_root / 'tallrec/book/test.json'}) "
                     "repeats 1 records (record = earlier record: 946 = 935): each weighs twice (TALLRec's file as "
                     "published; kept for comparability)"])


# --- 13: one line for each ----------------------------------------------------------------------------------------

def test_a_batch_larger_than_the_few_shot_set_stops_before_training(tmp_path, data_root):
  with pytest.raises(ConfigError, match=r"^config.train.batch_size=32 is more than the 16 training examples "
                                        r"\(data.shots=16\): lower it, or train on more$"):
    loop.train(_tiny(batch_size=32), tmp_path / "run")
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_mesh_that_does_not_divide_the_devices_is_one_line(tmp_path):
  n = len(sharding.jax.devices())
  for mesh in ((n + 1, 1, 1), (-1, n + 1, 1)):
    with pytest.raises(ConfigError, match=rf"^config.mesh=\({mesh[0]}, {mesh[1]}, 1\) does not divide the {n} "
                                          rf"devices: give sizes whose product is {n} \(-1 takes the rest\)$"):
      sharding.make_mesh(mesh)
  with pytest.raises(ConfigError, match=r"config.mesh=\(0, -1, 1\): give 3 sizes \(data, fsdp, tensor\), positive"):
    sharding.make_mesh((0, -1, 1))
  c = _tiny()
  c.mesh = (n + 1, 1, 1)
  with pytest.raises(ConfigError, match=r"config.mesh"):
    loop.train(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_missing_config_file_is_one_line():
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  r = subprocess.run([sys.executable, "train.py", "--config=configs/nope.py"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: --config=configs/nope.py: no such file (run from the repository root, or give the config file's path)")


def test_a_size_given_as_a_string_in_a_checkpoints_config_json(tmp_path):
  cfg = dict(presets["tiny"].to_hf_dict(), hidden_size="64")
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelError, match=r"config.json: hidden_size='64' is not a positive whole number; fix: write it "
                                       r"as one, without quotes$"):
    loading.load_model(tmp_path)


def test_an_hf_folder_without_a_tokenizer(tmp_path, monkeypatch):
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: (object(), None))  # what it returns for such a folder
  c = tiny.get_config()
  c.model.preset, c.model.source = "", str(tmp_path)
  with pytest.raises(ConfigError, match=rf"^config.model.source='{tmp_path}': the folder holds no tokenizer "
                                        r"\(tokenizer.json, tokenizer.model or tokenizer_config.json\): copy the "
                                        r"tokenizer files of its base model there$"):
    build.build_model(c)


def test_a_read_only_run_folder_is_one_line(tmp_path, monkeypatch):
  mkdir = pathlib.Path.mkdir

  def read_only(self, *a, **k):
    if str(self).startswith(str(tmp_path)):
      raise PermissionError(13, "Permission denied", str(self))
    return mkdir(self, *a, **k)
  monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
  with pytest.raises(ConfigError, match=rf"^{tmp_path / 'run'}: cannot write the run there \(Permission denied\): "
                                        r"pass a --workdir you can write to$"):
    loop.train(_tiny(), tmp_path / "run")
  assert PermissionError in cli.USER_ERRORS  # eval.py writing into such a folder: one line too


class _SignalAt:
  """A stage's batch iterator that signals this process when asked for batch `n`."""

  def __init__(self, it, n: int, sig):
    self.it, self.n, self.sig, self.count = it, n, sig, 0

  def __next__(self):
    self.count += 1
    if self.count == self.n:
      os.kill(os.getpid(), self.sig)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def test_ctrl_c_saves_and_stops_quietly_then_the_same_command_goes_on(tmp_path, data_root, monkeypatch, capsys):
  run_stage = trainer.run_stage

  def interrupted(stage, model, mesh):
    stage = dataclasses.replace(stage, batches=lambda b=stage.batches: _SignalAt(b(), 2, signal.SIGINT))
    return run_stage(stage, model, mesh)
  monkeypatch.setattr(trainer, "run_stage", interrupted)
  summary = loop.train(_tiny(max_steps=3), tmp_path / "run")
  assert summary["preempted"] and summary["steps"] == 2
  assert "preempted at step 2 of rec: run the same command again to continue" in loop.format_summary(summary)
  ckpts = checkpoint.Checkpoints(tmp_path / "run")
  assert ckpts.latest.latest_step() == 2
  ckpts.close()
  monkeypatch.setattr(trainer, "run_stage", run_stage)
  assert loop.train(_tiny(max_steps=3), tmp_path / "run")["steps"] == 3  # nothing lost: it goes on
  # Ctrl-C outside the training steps (building, scoring): one line, no traceback
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.clear_errors(lambda argv: (_ for _ in ()).throw(KeyboardInterrupt))([])
  assert e.value.code == 130
  assert capsys.readouterr().err == "interrupted: run the same command again to go on from the last checkpoint\n"


# --- 7: a collapsed model ----------------------------------------------------------------------------------------

def test_a_collapsed_model_is_said_in_the_summary_without_failing_the_run(tmp_path, data_root, monkeypatch):
  monkeypatch.setattr(runconfig, "validate", lambda config: None)  # lr=1e30 is refused since; it killed the model
  c = _tiny()
  c.optim.lr = 1e30
  summary = loop.train(c, tmp_path / "run")
  assert summary["valid_auc"] == 0.5 and summary["collapsed"] == "every valid prompt scored alike"
  assert loop.format_summary(summary, c).splitlines()[0] == (
      "collapsed: every valid prompt scored alike (the model answers every prompt alike): lower optim.lr and train "
      "again in a new --workdir")
  assert json.loads((tmp_path / "run" / trainer.DONE).read_text())["collapsed"] == summary["collapsed"]
  assert evaluate.collapsed(None, grad_norm=0.0, test=0.0) == (
      "zero gradients at the last step; every test prompt scored alike")
  assert evaluate.collapsed(grad_norm=0.1, valid=0.2) is None and "collapsed" not in loop.format_summary(
      {"collapsed": None})
