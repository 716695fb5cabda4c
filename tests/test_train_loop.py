"""Trainer guards: a non-finite loss stops with the step and loss term; nothing non-finite is saved."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clclm_jax.contrastive import feedback
from clclm_jax.data import configured, prompts, tallrec
from clclm_jax.data.errors import DataError
from clclm_jax.data.records import Catalogue, Interaction, Item
from clclm_jax.train import checkpoint, loop, predictions, sharding, trainer
from clclm_jax.train.errors import ConfigError
from configs import tiny
import train_helpers


def test_non_finite_loss_names_step_and_term():
  with pytest.raises(FloatingPointError, match=r"step 7: .*loss/contrastive"):
    trainer.check_finite({"loss": np.nan, "loss/lm": 2.0, "loss/contrastive": np.inf, "grad_norm": np.nan}, 7)
  trainer.check_finite({"loss": 1.0, "loss/lm": 1.0}, 1)


def test_non_finite_params_are_never_saved(tmp_path):
  ckpts = checkpoint.Checkpoints(tmp_path)
  with pytest.raises(FloatingPointError, match="not saving"):
    ckpts.save_best(3, {"lora_a": jnp.array([1.0, jnp.nan])}, {"step": 3})
  assert ckpts.best_step() is None
  ckpts.close()


def test_configs_are_locked_and_tiny_is_small():
  c = tiny.get_config()
  with pytest.raises(AttributeError):
    c.train.nope = 1
  assert c.model.preset == "tiny" and c.data.test_size > 0



def _losses(workdir):
  return [json.loads(l)["train/loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _tiny(stages=("rec",), init_from=""):
  """configs/tiny.py cut to 2 steps per stage and no test split."""
  c = tiny.get_config()
  c.stages, c.lora.init_from = stages, init_from
  c.data.test_size, c.train.max_steps, c.train.eval_every = 0, 2, 2
  return c


def test_rec_stage_starts_from_stage_one_or_an_imported_peft_adapter(tmp_path, data_root):
  loop.train(_tiny(stages=("instruct", "rec")), tmp_path / "two")
  assert len(_losses(tmp_path / "two" / "instruct")) == 2 and len(_losses(tmp_path / "two")) == 2
  adapter = loop.export_best_peft(_tiny(), tmp_path / "two" / "instruct", tmp_path / "adapter")
  assert (adapter / "adapter_config.json").is_file()
  loop.train(_tiny(init_from=str(adapter)), tmp_path / "peft")
  loop.train(_tiny(), tmp_path / "scratch")
  two, imported, scratch = (_losses(tmp_path / d) for d in ("two", "peft", "scratch"))
  np.testing.assert_allclose(imported, two, rtol=1e-6)  # the same LoRA start, data and keys
  assert abs(scratch[0] - two[0]) > 1e-4
  wider = _tiny(init_from=str(adapter))
  wider.lora.r, wider.lora.alpha = 8, 16.0
  with pytest.raises(ConfigError, match=r"does not fit the config \(lora.r: 4 in the adapter, 8 in the config; "
                                        r"lora.alpha: 8.0 in the adapter, 16.0 in the config\)"):
    loop.train(wider, tmp_path / "wider")


def test_summary_puts_the_like_ratio_reference_beside_each_auc():
  text = loop.format_summary({"best_step": 5, "valid_auc": 0.515, "valid_like_ratio_auc": 0.7021,
                              "test_auc": 0.5225, "test_like_ratio_auc": 0.6962, "wall_s": 12.0})
  valid, test = (next(l for l in text.splitlines() if l.startswith(k)) for k in ("valid AUC", "test AUC"))
  assert "0.5150" in valid and valid.endswith("history like-ratio on the same prompts: 0.7021")
  assert "0.5225" in test and test.endswith("history like-ratio on the same prompts: 0.6962")
  assert "like-ratio" not in loop.format_summary({"valid_auc": 0.6, "test_auc": None, "test_like_ratio_auc": 0.7})


def test_summary_names_tallrecs_published_auc_only_for_its_test_set_and_shots(tmp_path):
  from configs import book  # pylint: disable=g-import-not-at-top
  config, summary = book.get_config(), {"test_auc": 0.6839, "test_like_ratio_auc": 0.70, "shots": 64, "wall_s": 2061.0}
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "test_predictions.jsonl").write_text("")
  text = loop.format_summary(summary, config, tmp_path, "configs/book.py")
  assert "TALLRec, LLaMA-7B, 64-shot (published): 0.6039" in text and "34 min 21 s" in text
  assert f"predictions       {tmp_path / 'eval' / 'test_predictions.jsonl'}" in text
  assert f"python eval.py --config=configs/book.py --workdir={tmp_path} --compare_to=" in text
  assert "export_peft" not in text  # a fused model is more than a PEFT adapter
  assert "published" not in loop.format_summary({**summary, "shots": 100}, config)  # not a shot count of the paper
  config.data.test_size = 500
  assert "published" not in loop.format_summary(summary, config)  # not the whole test set


def test_summary_says_how_many_prompts_each_auc_is_on_and_whether_the_residual_step_was_kept():
  confirm = {"keep": False, "n": 1000, "difference": 0.0011, "ci95": [-0.0039, 0.0056], "best_step": 8}
  summary = {"best_step": 0, "encoder_valid_auc": 0.6966, "encoder_valid_n": 1000, "valid_auc": 0.6507,
             "valid_n": 128, "valid_like_ratio_auc": 0.666, "confirm": confirm, "test_auc": 0.692}
  lines = loop.format_summary(summary).splitlines()
  assert lines[1].endswith("0.6966   on 1000 prompts")
  assert lines[2].endswith("0.6507   on 128 prompts; history like-ratio on the same prompts: 0.6660")
  assert lines[3].startswith("confirmed             not kept   step 8 against the encoder alone on 1000 validation")
  assert lines[3].endswith("+0.0011 (95% -0.0039 .. +0.0056); the model is its encoder")
  kept = loop.format_summary({**summary, "confirm": {**confirm, "keep": True}}).splitlines()[3]
  assert "    kept   step 8" in kept and "its encoder" not in kept
  assert "confirmed" not in loop.format_summary({k: v for k, v in summary.items() if k != "confirm"})


def test_like_ratio_references_score_the_same_prompts_as_evaluation(data_root):
  c = tiny.get_config()
  sp = configured.rec_splits(c)
  refs = loop.like_ratio_references(c)
  assert set(refs) == {"valid_like_ratio_auc", "test_like_ratio_auc"}
  test = configured.eval_interactions(c, sp, "test")
  assert len(test) == c.data.test_size
  labels = np.array([x.label for x in test])
  share = np.array([np.mean(x.history_likes) if x.history_likes else 0.5 for x in test])
  pos, neg = share[labels == 1], share[labels == 0]
  pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
  assert refs["test_like_ratio_auc"] == pytest.approx(pairs)


def _tallrec_files(folder, sizes=(("train", 24), ("valid", 12), ("test", 12)), domain="book"):
  """Synthetic TALLRec files (no licensed data): Yes prompts have 5 of 6 history items liked, No prompts 1."""
  rng = np.random.default_rng(0)
  catalogue = Catalogue(Item(i, f"{domain.title()} number {i}", f"Author {i % 5}" if domain == "book" else None)
                        for i in range(1, 31))
  files = {}
  for name, n in sizes:
    xs = []
    for k in range(n):
      likes = tuple(j < (5 if k % 2 else 1) for j in range(6))
      xs.append(Interaction(0, tuple(int(i) for i in rng.choice(np.arange(1, 31), 6, replace=False)), likes,
                            int(rng.integers(1, 31)), int(k % 2)))
    files[name] = folder / f"{name}.json"
    files[name].write_text(tallrec.dumps_tallrec([prompts.tallrec_record(x, catalogue, domain) for x in xs]))
  return files


def _files_config(files, **data):
  c = tiny.get_config()
  for k in ("train", "valid", "test"):
    c.data.files[k] = str(files.get(k, ""))
  c.data.shots, c.data.valid_size, c.data.test_size = 16, -1, -1
  c.train.num_epochs, c.train.eval_every = 1, 2
  for k, v in data.items():
    c.data[k] = v
  return c


def test_own_tallrec_files_train_and_score_like_built_in_splits(tmp_path):
  files = _tallrec_files(tmp_path)
  summary = loop.train(_files_config(files), tmp_path / "run")
  test = json.loads((tmp_path / "run" / "eval" / "test_metrics.json").read_text())
  assert test["n"] == 12 and 0.0 <= summary["test_auc"] <= 1.0
  assert summary["valid_like_ratio_auc"] == test["like_ratio_auc"] == 1.0  # the like-ratio separates the labels
  assert len(_losses(tmp_path / "run")) == 16 // 4
  preds = [json.loads(l) for l in (tmp_path / "run" / "eval" / "test_predictions.jsonl").read_text().splitlines()]
  records = json.loads(files["test"].read_text())
  assert [r["record"] for r in preds] == list(range(12))  # the file's own record order
  assert all(r["label"] == (records[r["record"]]["output"] == "Yes.") for r in preds)


def test_own_tallrec_files_errors_name_the_field_and_fix(tmp_path):
  files = _tallrec_files(tmp_path)
  with pytest.raises(ValueError, match=r"config.data.files: set valid too"):
    configured.rec_splits(_files_config({"train": files["train"]}))
  with pytest.raises(ValueError, match=r"files.test is empty: set it, or data.test_size=0"):
    configured.rec_splits(_files_config({k: files[k] for k in ("train", "valid")}))
  assert configured.rec_splits(_files_config({k: files[k] for k in ("train", "valid")}, test_size=0)).test == []
  with pytest.raises(ConfigError, match=r"config.data.files.valid='nope.json': no such file"):
    configured.rec_splits(_files_config({"train": files["train"], "valid": "nope.json", "test": files["test"]}))
  c = _files_config(files, valid_size=50)
  with pytest.raises(ValueError, match=r"config.data.valid_size=50, but the valid split has 12 prompts"):
    configured.eval_interactions(c, configured.rec_splits(c), "valid")
  files["valid"].write_text("[]")
  with pytest.raises(DataError, match=r"valid.json: holds no records; fix: give it at least one TALLRec record"):
    configured.rec_splits(_files_config(files))
  files = _tallrec_files(tmp_path)
  files["test"].write_text(files["test"].read_text().replace("Whether the user will like", "Will the user like", 1))
  with pytest.raises(DataError, match=r"test.json record 0: input is not"):
    configured.rec_splits(_files_config(files))
  files = _tallrec_files(tmp_path)
  files["valid"].write_text(files["valid"].read_text().replace('"output": "No."', '"output": "Yes."'))
  with pytest.raises(ConfigError, match=r"config.data.files.valid='.*valid.json': the prompts valid scores all have "
                                        r"the label 'Yes.', and AUC needs both"):
    loop.train(_files_config(files), tmp_path / "one_class")  # before any training step
  assert not (tmp_path / "one_class" / "metrics.jsonl").exists()


def test_own_files_may_hold_any_item_domain(tmp_path):
  files = _tallrec_files(tmp_path, domain="board game")
  record = json.loads(files["train"].read_text())[0]
  assert "the target board game by answering" in record["instruction"]
  assert record["input"].endswith('Whether the user will like the target board game "Board Game number 28"?')
  sp = configured.rec_splits(_files_config(files, domain="board game"))
  assert [prompts.tallrec_record(x, sp.catalogue, "board game") for x in sp.train] == json.loads(
      files["train"].read_text())  # parsed and rendered back to the same records
  with pytest.raises(DataError, match=r"train.json record 0: instruction is not TALLRec's movie instruction \(it "
                     r"asks about the target board game\); fix: set config.data.domain='board game'"):
    configured.rec_splits(_files_config(files, domain="movie"))
  with pytest.raises(ConfigError, match=r"config.data.domain='board game': the built-in data is movie and book; "
                     r"for other items give your own TALLRec-format files"):
    configured.rec_splits(_files_config({}, domain="board game"))
  with pytest.raises(ConfigError, match=r"config.data.domain 'game!' is not an item word"):
    configured.rec_splits(_files_config(files, domain="game!"))


def test_fused_pretraining_reads_histories_of_own_files_not_movielens(tmp_path):
  files = _tallrec_files(tmp_path)
  sp = configured.rec_splits(_files_config(files))
  seqs = feedback.behaviour_sequences("movie", sp, root=tmp_path / "no-movielens-here", timelines=False)
  assert [tuple(ids) for ids, _ in seqs] == [x.history_ids for x in sp.train + sp.valid + sp.test]


def test_compare_runs_pairs_predictions_by_record(tmp_path):
  labels, rng = np.arange(40) % 2, np.random.default_rng(1)
  records = rng.permutation(100)[:40]
  predictions.write(tmp_path / "a", "test", records, labels, labels * 0.6 + rng.random(40) * 0.5)
  predictions.write(tmp_path / "b", "test", records[::-1], labels[::-1], rng.random(40))  # any row order
  c = predictions.compare(tmp_path / "a", tmp_path / "b", resamples=200)
  assert c["n"] == 40 and c["difference"] == pytest.approx(c["auc_a"] - c["auc_b"]) and c["auc_a"] > c["auc_b"]
  text = predictions.format_comparison(c)
  assert f"A {c['auc_a']:.4f}" in text and "paired bootstrap over 40 prompts" in text
  predictions.write(tmp_path / "c", "test", records[:30], labels[:30], rng.random(30))
  with pytest.raises(ConfigError, match="scored different test prompts"):
    predictions.compare(tmp_path / "a", tmp_path / "c")
  with pytest.raises(FileNotFoundError, match=r"score that run first .*--split=valid"):
    predictions.compare(tmp_path / "a", tmp_path / "b", split="valid")


def test_resume_and_scoring_check_the_runs_config(tmp_path, data_root):
  run = tmp_path / "run"
  loop.train(_tiny(), run)
  assert json.loads((run / "config.json").read_text()) == json.loads(json.dumps(_tiny().to_dict()))
  other = _tiny()
  other.optim.lr, other.data.shots = 2e-3, 32
  with pytest.raises(ConfigError, match=r"holds a run with another config \(data.shots: 16 in the run, 32 now; "
                                        r"optim.lr: 0.001 in the run, 0.002 now\)"):
    loop.train(other, run)
  longer = _tiny()
  longer.train.max_steps = 4  # how long a run goes may change on resume
  loop.train(longer, run)
  assert len(_losses(run)) == 4 and json.loads((run / "config.json").read_text())["train"]["max_steps"] == 4
  wider = _tiny()
  wider.lora.r = 8
  with pytest.raises(ConfigError, match=r"trained with another model \(lora.r: 4 in the run, 8 now\)"):
    loop.evaluate_split(wider, run, "valid")
  with pytest.raises(ConfigError, match=r"lora.r: 4 in the run, 8 now"):
    loop.export_best_peft(wider, run, tmp_path / "adapter")


class Killed(BaseException):
  """The process dies here: nothing after this point runs (no save, no cleanup)."""


def _raise_killed():
  raise Killed


def test_fused_recipe_killed_inside_stage2_resumes_bitwise(tmp_path, data_root, monkeypatch):
  """Resume is about the saved state, keys and data order, not the losses: the sequence augmentation (seq_cl, whose
  compile is most of the recipe's) is off here; test_cli's tiny_fused run trains the recipe with it end to end."""
  from clclm_jax.contrastive import recipe  # pylint: disable=g-import-not-at-top
  from configs import tiny_fused  # pylint: disable=g-import-not-at-top
  c = tiny_fused.get_config()
  c.data.test_size, c.stage2.steps, c.train.checkpoint_every = 0, 3, 1
  c.fusion.pretrain.cl_weight = c.stage2.loss_weights.seq_cl = 0.0
  whole = recipe.train(c, tmp_path / "whole", log=lambda _: None)
  run_stage = trainer.run_stage

  def dying(action):
    def run(stage, model, mesh):
      if stage.name == "fused":
        stage = dataclasses.replace(stage, batches=lambda b=stage.batches: train_helpers.DiesAt(b(), 2, action))
      return run_stage(stage, model, mesh)
    return run
  monkeypatch.setattr(trainer, "run_stage", dying(_raise_killed))
  with pytest.raises(Killed):
    recipe.train(c, tmp_path / "run", log=lambda _: None)
  assert (tmp_path / "run" / "checkpoints" / "latest" / "1").is_dir()  # step 1 of stage 2 was saved
  monkeypatch.setattr(trainer, "run_stage", run_stage)
  said = []
  resumed = recipe.train(c, tmp_path / "run", log=said.append)
  assert said == ["encoder: finished before (step 18), its parameters restored",
                  "text: finished before (step 2), its parameters restored"]
  assert {k: resumed[k] for k in ("valid_auc", "encoder_valid_auc", "steps", "best_step")} == {
      k: whole[k] for k in ("valid_auc", "encoder_valid_auc", "steps", "best_step")}
  same = lambda name: (tmp_path / "whole" / name).read_text() == (tmp_path / "run" / name).read_text()  # noqa: E731
  assert same("metrics.jsonl") and same("config.json") and same("text/metrics.jsonl")
  (a, step_a), (b, step_b) = train_helpers.best_params(tmp_path / "whole"), train_helpers.best_params(tmp_path / "run")
  assert step_a == step_b == 3
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  again = recipe.train(c, tmp_path / "run", log=said.append)  # a finished run says so and returns its summary
  assert again == resumed and said[-1].endswith("is finished: its summary follows "
                                                f"(delete {tmp_path / 'run' / 'summary.json'} to score it again)")
  c.stage2.steps = 4
  with pytest.raises(ConfigError, match=r"stage2.steps: 3 in the run, 4 now"):
    recipe.train(c, tmp_path / "run")


def test_sigterm_inside_stage1_saves_and_returns_preempted(tmp_path, data_root, monkeypatch):
  from clclm_jax.contrastive import recipe  # pylint: disable=g-import-not-at-top
  from configs import tiny_fused  # pylint: disable=g-import-not-at-top
  c = tiny_fused.get_config()
  c.data.test_size, c.fusion.pretrain.epochs, c.stage1.steps = 0, 0, 4
  run_stage = trainer.run_stage

  def preempted(stage, model, mesh):
    if stage.name == "text":
      term = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
      stage = dataclasses.replace(stage, batches=lambda b=stage.batches: train_helpers.DiesAt(b(), 2, term))
    return run_stage(stage, model, mesh)
  monkeypatch.setattr(trainer, "run_stage", preempted)
  summary = recipe.train(c, tmp_path / "run", log=lambda _: None)
  assert summary["preempted"] and summary["stage"] == "text" and summary["steps"] == 2
  assert (tmp_path / "run" / "text" / "checkpoints" / "latest" / "2").is_dir()
  assert not (tmp_path / "run" / "text" / trainer.DONE).exists() and not (tmp_path / "run" / "summary.json").exists()
  assert "preempted at step 2 of text: run the same command again to continue" in loop.format_summary(summary)


class _TickingBatches:
  """Synthetic batches on a fake clock: each batch costs `tick` seconds; SIGINT while batch `stop_at` is taken."""

  def __init__(self, clock: list, tick: float, stop_at: int = 0):
    self.batches, self.i = train_helpers.synthetic_batches(12), 0
    self.clock, self.tick, self.stop_at = clock, tick, stop_at

  def __next__(self):
    self.i += 1
    self.clock[0] += self.tick
    if self.i == self.stop_at:
      os.kill(os.getpid(), signal.SIGINT)
    return self.batches[self.i - 1]

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_a_resumed_stage_keeps_its_time_budget_and_wall_time_across_runs(tmp_path, monkeypatch):
  """A stage stopped after 20 s of its 35 s budget trains 2 more steps of 10 s when rerun, not 4, and says 40 s."""
  clock = [0.0]
  monkeypatch.setattr(trainer, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
  mesh = sharding.make_mesh((-1, 1, 1))

  def stage(stop_at):
    return trainer.Stage("rec", tmp_path, lambda: _TickingBatches(clock, 10.0, stop_at), {"lm": 1.0}, 10,
                         train_helpers.optim_config(), 8, 8, max_seconds=35.0)
  model = train_helpers.tiny_model()
  trainer.place(model, mesh)
  first = trainer.run_stage(stage(stop_at=2), model, mesh)
  assert first["preempted"] and first["steps"] == 2 and first["wall_s"] == 20.0
  model = train_helpers.tiny_model()
  trainer.place(model, mesh)
  second = trainer.run_stage(stage(stop_at=0), model, mesh)
  assert (second["steps"], second["stopped"], second["wall_s"]) == (4, "time budget", 40.0)


@pytest.mark.parametrize("field,value,message", [
    ("optim.lr", 0.0, r"config.optim.lr=0.0: use a learning rate in \(0, 1\]"),
    ("optim.lr", -1e-3, r"config.optim.lr=-0.001: use a learning rate"),
    ("optim.lr", 1e30, r"config.optim.lr=1e\+30: use a learning rate"),
    ("optim.warmup_steps", -1, r"config.optim.warmup_steps=-1: use 0 or more"),
    ("train.batch_size", 0, r"config.train.batch_size=0: use a positive whole number"),
    ("train.micro_batch_size", 0, r"config.train.micro_batch_size=0: use a positive whole number"),
    ("train.eval_batch_size", 0, r"config.train.eval_batch_size=0: use a positive whole number"),
    ("train.batch_size", 6, r"config.train.batch_size=6: use a multiple of train.micro_batch_size=4"),
    ("model.dtype", "float16", r"config.model.dtype='float16': use one of \['bfloat16', 'float32'\]"),
    ("model.source", "my/llama", r"config.model.source='my/llama': model.preset='tiny' builds a random model"),
    ("model.remat", "some", r"config.model.remat='some': use '' \(none\), 'full' or 'dots'"),
    ("model.attention_impl", "flash", r"config.model.attention_impl='flash': use one of custom, xla, cudnn"),
])
def test_bad_config_values_stop_before_anything_is_built(field, value, message, tmp_path):
  c = tiny.get_config()
  c.train.micro_batch_size = 4
  block, name = field.split(".")
  c[block][name] = value
  with pytest.raises(ConfigError, match=message):
    loop.train(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_second_training_in_the_same_folder_stops_naming_the_first(tmp_path):
  with trainer.RunLock(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by process {os.getpid()} \(a training is running"):
      with trainer.RunLock(tmp_path):
        pass
  with trainer.RunLock(tmp_path):  # released when the first run ends
    pass


def test_the_configs_model_fields_reach_the_model():
  from clclm_jax.model import build  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.model.remat, c.model.attention_impl = "dots", "xla"
  model, _ = build.build_model(c)
  assert model.remat == "dots" and model.attention_impl == "xla"
