"""LLaRA's candidate task and Cao et al.'s auxiliary prompts: seeded candidate sampling without history items,
prompt tokens and answer spans, auxiliary prompts free of validation / test targets, the task mixture and its
resume, decoding-free HitRatio@1 against a numpy reference, answer matching, one-line config errors, and the
tiny config through the one trainer."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clclm_jax.data import auxtasks, nextitem, sequences
from clclm_jax.data import candidates as cd
from clclm_jax.seqrec import candidates as cs
from clclm_jax.train import trainer
from clclm_jax.train.errors import ConfigError
import train_helpers

# Items 13 and 14 share a title (as 18 MovieLens titles do): never both among one example's candidates.
TITLES = [f"title {w}" for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
                                 "juliet", "kilo", "lima")] + ["same name", "same name"] + [
                                     f"long title number {i} with words" for i in range(15, 41)]
HISTORIES = [(1, 2, 3, 4, 5, 6), (7, 8, 9, 10, 11), (12, 1, 3, 5, 7, 9, 2), (4, 6, 8, 10, 12, 13, 14),
             (15, 16, 17, 18), (2, 4, 19, 20, 21, 22, 23)]
LAYOUT = cd.Layout(max_history=3, max_prompt_tokens=512, max_item_tokens=16, pad_multiple=32)
SETTINGS = auxtasks.TaskSettings(max_history=3, num_candidates=5, mim_max_masks=2, mlm_max_words=4,
                                 mlm_mask_rate=0.5)


@pytest.fixture(scope="module")
def toy():
  """A toy catalogue, the byte tokenizer and its prompt tokens, and a tiny float Llama with active LoRA."""
  data = nextitem.from_histories("toy", "movie", HISTORIES, TITLES)
  tok, llm = train_helpers.byte_llm()
  return data, tok, cd.PromptTokens(data, tok, LAYOUT.max_item_tokens), llm


def test_candidates_hold_the_target_once_no_history_item_and_are_seeded(toy):
  data = toy[0]
  for part in nextitem.PARTS:
    xs = cd.candidate_examples(data, part, num_candidates=5, seed=3)
    assert xs and [(x.user, x.history, x.target) for x in xs] == [tuple(e) for e in nextitem.examples(data, part)]
    for x in xs:
      assert len(x.candidates) == 5 and x.candidates.count(x.target) == 1
      negatives = set(x.candidates) - {x.target}
      assert len(negatives) == 4 and not negatives & set(data.histories[x.user])  # never interacted with
      assert len({data.titles[i - 1] for i in x.candidates}) == 5  # distinct texts: 13 and 14 never together
    again = cd.candidate_examples(data, part, num_candidates=5, seed=3)
    assert again == xs
    alone = [cd.sample_candidates(data, nextitem.Example(x.user, x.history, x.target),
                                  cd.example_rng(3, nextitem.Example(x.user, x.history, x.target)), 5) for x in xs]
    assert alone == [x.candidates for x in xs]  # an example's draw does not depend on the others
  tests = cd.candidate_examples(data, "test", num_candidates=5, seed=3)
  assert [x.candidates for x in tests] != [x.candidates for x in cd.candidate_examples(
      data, "test", num_candidates=5, seed=4)]
  cols = {x.candidates.index(x.target) for s in range(6) for x in cd.candidate_examples(data, "test", seed=s,
                                                                                         num_candidates=5)}
  assert len(cols) > 2  # the target's position is drawn, not fixed
  with pytest.raises(ValueError, match="lower data.num_candidates"):
    cd.candidate_examples(data, "test", num_candidates=40)


def test_rec_prompt_tokens_and_answer_spans(toy):
  data, tok, _, _ = toy
  pt = cd.PromptTokens(data, tok, 64)  # no title cut: the tokens decode to the rendered text
  xs = cd.candidate_examples(data, "valid", num_candidates=5, seed=0)
  prompts = [cd.rec_prompt(data, x, LAYOUT.max_history) for x in xs]
  batch = cd.train_batch(pt, prompts, LAYOUT)
  assert batch["tokens"].shape[1] % LAYOUT.pad_multiple == 0
  for r, (x, p) in enumerate(zip(xs, prompts)):
    text = tok.decode(batch["tokens"][r][batch["attention_mask"][r] > 0])
    want = cd.render(data, p.lines)
    assert text == "<s>" + want + data.titles[x.target - 1] + "\n"
    assert want.startswith(nextitem.HEADERS["movie"] + "\n" + "".join(
        data.titles[i - 1] + "\n" for i in x.history[-3:]) + cd.CANDIDATES_LINE + "\n")
    assert want.endswith(cd.question("movie") + "\n")
    assert tok.decode(batch["tokens"][r][batch["loss_mask"][r] > 0]) == data.titles[x.target - 1] + "\n"
    idx = batch["target_index"][r][batch["target_index"][r] > 0]
    np.testing.assert_array_equal(idx, np.flatnonzero(batch["loss_mask"][r]))
  assert batch["target_index"].shape[1] == pt.answer_width(LAYOUT)
  long = cd.PromptTokens(data, tok, 5)  # titles cut at 5 tokens, in the prompt and the answer alike
  assert long.title_text(15) == "long" and len(long.lines([15])) == 6


def _mentioned(prompt: cd.Prompt) -> set[int]:
  return {x for x in (*prompt.lines, *prompt.answer, *prompt.candidates) if isinstance(x, int)}


def test_aux_prompts_come_from_training_histories_only(toy):
  data, _, pt, _ = toy
  train_items = {u: set(h) for u, h in enumerate(nextitem.train_histories(data))}
  held_out = {u: {h[-1], h[-2]} - train_items[u] for u, h in enumerate(data.histories)}
  examples = nextitem.examples(data, "train")
  ratios = {"rec": 1.0, "mim": 1.0, "bpr": 1.0, "mlm": 1.0}
  source = auxtasks.train_batches(data, pt, examples, ratios, 4, LAYOUT, SETTINGS, seed=0)
  seen = set()
  for epoch in range(30):
    source.set_state({"epoch": epoch, "index": 0})
    for i in range(len(source.batches)):
      for p in source.batches.prompts(i):
        seen.add(p.task)
        assert not _mentioned(p) & held_out[p.user], p  # no validation or test target of the user
        if p.task in ("mim", "bpr"):
          history = [x for x in p.lines if isinstance(x, int) and x not in p.candidates]
          assert set(history) <= train_items[p.user]
        if p.task == "mim":
          masks = [x for x in p.lines[1:-1]]
          assert 1 <= masks.count(auxtasks.MASK) == len(p.answer) <= 2 and set(p.answer) <= train_items[p.user]
          filled = iter(p.answer)
          seq = [next(filled) if x == auxtasks.MASK else x for x in masks]
          assert any(tuple(seq) == h[max(0, k - 3):k] for h in [nextitem.train_histories(data)[p.user]]
                     for k in range(2, len(h) + 1))  # the hidden items are the sequence's, in order
        if p.task == "bpr":
          assert len(p.candidates) == 2 and p.answer[0] in p.candidates
          assert not set(p.candidates) - {p.answer[0]} & set(data.histories[p.user])
        if p.task == "mlm":
          words = iter(p.answer[0].split())
          filled = " ".join(next(words) if w == auxtasks.MASK else w for w in p.lines[1].split())
          assert auxtasks.MASK in p.lines[1] and any(
              " ".join(data.titles[i - 1].split()[:4]) == filled for i in train_items[p.user])
  assert seen == set(auxtasks.TASKS)


def test_mixture_follows_the_ratios_and_resumes_exactly(toy):
  data, _, pt, _ = toy
  examples = nextitem.examples(data, "train")
  only = auxtasks.train_batches(data, pt, examples, {"rec": 0.0, "mlm": 2.0}, 2, LAYOUT, SETTINGS, seed=1)
  assert {p.task for i in range(len(only.batches)) for p in only.batches.prompts(i)} == {"mlm"}
  ratios = {"rec": 1.0, "mim": 0.5, "bpr": 0.5}
  source = auxtasks.train_batches(data, pt, examples, ratios, 2, LAYOUT, SETTINGS, seed=1)
  for _ in range(3):
    next(source)
  state = source.get_state()
  rest = [next(source) for _ in range(20)]  # crosses epoch boundaries
  again = auxtasks.train_batches(data, pt, examples, ratios, 2, LAYOUT, SETTINGS, seed=1)
  again.set_state(json.loads(json.dumps(state)))
  for a, b in zip(rest, [next(again) for _ in range(20)], strict=True):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert rest[0]["target_index"].shape[1] == 2 * pt.line_bound()  # mim: up to 2 answer lines
  _, probs = auxtasks.mixture(ratios)
  tasks = np.concatenate([p[:, 1] for e in range(40) for p in auxtasks.epoch_plan(
      len(examples), 2, probs, np.random.default_rng([1, e]))])
  np.testing.assert_allclose(np.bincount(tasks, minlength=3) / len(tasks), probs, atol=0.05)


@nnx.jit
def _logits(llm, tokens_bt, mask_bt):
  return llm(tokens_bt, None, mask_bt)


def test_decoding_free_scores_equal_a_numpy_reference(toy):
  data, _, pt, llm = toy
  xs = cd.candidate_examples(data, "test", num_candidates=5, seed=0)[:3]
  got = cs.candidate_scores(llm, pt, data, xs, LAYOUT, batch_size=2)  # a padded last call too
  assert got.shape == (3, 5)
  # The reference: every [prompt ; answer] row through the whole model, no cache, in one right-padded call.
  rows = [(u, c, pt.prompt(cd.rec_prompt(data, x, LAYOUT.max_history)), pt.lines([item]))
          for u, x in enumerate(xs) for c, item in enumerate(x.candidates)]
  width = max(len(p) + len(a) for _, _, p, a in rows)
  tokens = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for r, (_, _, p, a) in enumerate(rows):
    tokens[r, :len(p) + len(a)], mask[r, :len(p) + len(a)] = np.r_[p, a], 1
  logits = np.asarray(_logits(llm, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = np.zeros((3, 5))
  for r, (u, c, p, a) in enumerate(rows):
    want[u, c] = sum(logp[r, len(p) + j - 1, t] for j, t in enumerate(a))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)
  lengths = np.asarray([[len(pt.lines([i])) for i in x.candidates] for x in xs])
  np.testing.assert_allclose(cs.candidate_scores(llm, pt, data, xs, LAYOUT, batch_size=2, per_token=True),
                             want / lengths, rtol=2e-4, atol=2e-4)
  ranks = cs.target_ranks(got, xs)
  np.testing.assert_array_equal(ranks, [int((want[u] > want[u, x.candidates.index(x.target)]).sum())
                                        for u, x in enumerate(xs)])


def test_target_ranks_break_ties_by_prompt_order_and_hit_ratio():
  xs = [cd.CandidateExample(0, (), 7, (5, 7, 9)), cd.CandidateExample(1, (), 7, (7, 5, 9)),
        cd.CandidateExample(2, (), 9, (5, 7, 9))]
  scores = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
  ranks = cs.target_ranks(scores, xs)
  assert ranks.tolist() == [1, 0, 1]  # a tie goes to the candidate listed first
  assert cs.hit_ratio(ranks) == pytest.approx(1 / 3)


def test_answers_name_candidates_as_llara_counts_them(toy):
  titles = ["Toy Story (1995)", "Heat (1995)", "Heat and Dust (1983)"]
  assert cs.named_candidate("  toy story   (1995) ", titles) == 0
  assert cs.named_candidate("Heat (1995)", titles) == 1  # exact beats contained
  assert cs.named_candidate("I pick Toy Story (1995)!", titles) == 0  # the only one inside
  assert cs.named_candidate("Heat (1995) or Toy Story (1995)", titles) is None  # two inside: invalid
  assert cs.named_candidate("Casablanca", titles) is None
  data, _, pt, _ = toy
  xs = [cd.CandidateExample(0, (1,), 2, (3, 2, 4)), cd.CandidateExample(1, (1,), 2, (2, 3, 4)),
        cd.CandidateExample(2, (1,), 2, (2, 3, 4))]
  got = cs.answer_metrics(["title bravo", "TITLE charlie", "nothing"], xs, pt)
  assert got == {cs.HIT: pytest.approx(1 / 3), cs.VALID: pytest.approx(2 / 3)}


def test_bad_config_gets_one_line_errors(toy, tmp_path):
  from configs import tiny_cand  # pylint: disable=g-import-not-at-top
  cases = [("tasks.ratios", {"rec": 0.0, "mim": 0.0}, "config.tasks.ratios=.* sums to zero"),
           ("tasks.ratios", {"rec": 1.0, "cloze": 1.0}, r"config.tasks.ratios names unknown task\(s\) \['cloze'\]"),
           ("tasks.ratios", {"rec": -1.0}, "ratios must be finite and 0 or more"),
           ("data.dataset", "sports", "config.data.dataset='sports' has no item titles"),
           ("data.num_candidates", 1, "config.data.num_candidates=1: use 2 or more"),
           ("eval.num_beams", 0, "config.eval.num_beams=0: use 1"),
           ("eval.temperature", -0.5, "config.eval.temperature=-0.5: use 0"),
           ("eval.top_p", 0.0, r"config.eval.top_p=0.0: use a share in \(0, 1\]")]
  for field, value, message in cases:
    c = tiny_cand.get_config()
    block, name = field.split(".")
    with c.unlocked():
      c[block][name] = value
    with pytest.raises(ConfigError, match=message) as e:
      cs.train(c, tmp_path / "run")
    assert "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()
  c = tiny_cand.get_config()
  c.eval.num_beams, c.eval.temperature = 2, 0.7
  with pytest.raises(ConfigError, match="config.eval.temperature=0.7 with num_beams=2: beam search does not sample"):
    cs.check_config(c)
  data, _, pt, _ = toy
  c = tiny_cand.get_config()
  c.data.max_prompt_tokens = 100
  with pytest.raises(ConfigError, match=r"config.data.max_prompt_tokens=100: rec prompts may take \d+ tokens"):
    cs.check_lengths(c, pt, data.kind)


def test_tiny_config_trains_through_the_one_trainer(toy, tmp_path):
  from configs import tiny_cand  # pylint: disable=g-import-not-at-top
  data = toy[0]
  c = tiny_cand.get_config()
  c.data.max_users, c.data.valid_size, c.data.test_size = 0, 4, 4
  c.data.max_history, c.data.num_candidates = 3, 5
  c.eval.num_beams = 2  # the generated answers are the best beams
  said = []
  summary = cs.train(c, tmp_path / "run", log=said.append, data=data)
  assert [s["stage"] for s in summary["stages"]] == ["candidates"] and summary["stages"][0]["steps"] == 3
  assert summary["valid"]["count"] == 4 and 0 <= summary["valid"][cs.SCORED] <= 1
  # The summary's valid score is the stage's last check, not a second pass: the same as scoring the restored model.
  r = cs.build(c, data, tmp_path / "run")
  trainer.run(cs.stages(r, tmp_path / "run"), r.model, r.mesh, log=lambda _: None)  # finished: restores the best
  assert cs.scored_metrics(r, r.model, cs.subset(r, "valid", 4)) == summary["valid"]
  test = summary["test"]
  assert {cs.SCORED, cs.HIT, cs.VALID, "popularity", "count"} <= set(test)
  assert len((tmp_path / "run" / "eval" / "test_answers.jsonl").read_text().splitlines()) == 4
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3] and f"valid/{cs.METRIC}" in rows[-1]
  assert "test, popularity" in cs.format_summary(summary)
  assert cs.train(c, tmp_path / "run", log=said.append, data=data) == summary  # finished: the summary back
  assert "is finished" in said[-1]


def test_aux_rows_in_calrec_batches_train_generation_only(toy):
  from clclm_jax.data import nextitem_tokens  # pylint: disable=g-import-not-at-top
  data, tok, pt, _ = toy
  layout = nextitem_tokens.Layout(max_history=3, max_prompt_tokens=200, max_item_tokens=16, pad_multiple=32)
  it = nextitem_tokens.item_tokens(data, tok, layout.max_item_tokens)
  examples = nextitem.examples(data, "train")
  ratios = {"rec": 1.0, "mim": 1.0, "bpr": 1.0, "mlm": 1.0}
  source = auxtasks.calrec_train_batches([(it, examples, data, pt)], 4, layout, LAYOUT, ratios, SETTINGS, seed=2)
  aux_rows = 0
  for _ in range(12):
    batch = next(source)
    _, rows = source.batches.plan[source.index - 1]  # the examples of the batch just read
    plain = nextitem_tokens.train_batch(it, [examples[r] for r in rows], layout)
    for r in range(4):
      if batch["contrastive_valid"][r] == 0 and not batch["history_mask"][r].any():  # an auxiliary row
        aux_rows += 1
        answer = tok.decode(batch["tokens"][r][batch["loss_mask"][r] > 0])
        assert answer.endswith("\n") and not batch["target_mask"][r].any()
        idx = batch["target_index"][r][batch["target_index"][r] > 0]
        np.testing.assert_array_equal(idx, np.flatnonzero(batch["loss_mask"][r]))
      else:  # CALRec's own row, as the plain batch has it
        w = plain["tokens"].shape[1]
        for k in ("tokens", "attention_mask", "history_mask", "target_mask", "loss_mask"):
          np.testing.assert_array_equal(batch[k][r, :w], plain[k][r])
          assert not batch[k][r, w:].any()
  assert 0 < aux_rows < 48


def test_negatives_stop_with_an_error_when_distinct_titles_run_out():
  data = nextitem.from_histories("dup", "movie", [(1, 2, 3), (4, 5, 6)], ["a", "b", "c"] + ["same"] * 20)
  assert cd.sample_negatives(data, 0, 1, np.random.default_rng(0))[0] > 3  # one title is left: 'same'
  with pytest.raises(ValueError, match="too few items with distinct titles never interacted with for 2"):
    cd.sample_negatives(data, 0, 2, np.random.default_rng(0))  # 20 items, one text: stops instead of looping


def test_id_encoder_scores_its_candidates_as_its_full_ranking_would(toy):
  from clclm_jax.contrastive.encoder import SeqEncoder  # pylint: disable=g-import-not-at-top
  data = toy[0]
  encoder = SeqEncoder(data.num_items + 2, hidden=8, num_layers=1, num_heads=2, max_len=4, dropout=0.0,
                       attn_dropout=0.0, rngs=nnx.Rngs(0))
  xs = cd.candidate_examples(data, "test", num_candidates=5, seed=0)
  got = cs.encoder_scores(encoder, xs, batch_size=4)  # a padded last call
  items, _ = sequences.pad([np.asarray(x.history) for x in xs], 4)
  full = np.asarray(encoder.encode(jnp.asarray(items)) @ encoder.item_table().T)  # [u, vocab]: column i is id i
  np.testing.assert_allclose(got, np.take_along_axis(full, np.asarray([x.candidates for x in xs]), 1), rtol=1e-5,
                             atol=1e-6)
  pop = cs.popularity_scores(data, xs)
  counts = {i: sum(h.count(i) for h in nextitem.train_histories(data)) for i in range(1, data.num_items + 1)}
  assert pop.tolist() == [[counts[i] for i in x.candidates] for x in xs]


def test_a_run_saved_before_the_decoding_fields_resumes_and_other_changes_still_refuse(tmp_path):
  from clclm_jax.train import runconfig  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from configs import cand_ml100k  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  c = cand_ml100k.get_config()
  runconfig.save(c, tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  for k in ("temperature", "top_p", "num_beams"):  # as a run saved before they existed
    del saved["eval"][k]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  c.eval.num_beams = 4  # how answers decode is scoring, not training: may change on resume
  runconfig.check_resume(c, tmp_path)
  c.optim.lr *= 2
  with pytest.raises(ConfigError, match="optim.lr"):
    runconfig.check_resume(c, tmp_path)
