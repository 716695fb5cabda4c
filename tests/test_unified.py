"""Unified prompts (RSLLM / LLaRA, seqrec/unified.py): one soft token per item line at its placeholder, scoring and
generation of unified prompts against a full forward, the two InfoNCE losses against numpy, what each stage trains,
the curriculum's share, one-line errors, and the tiny unified config through train.py's candidates branch."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clclm_jax.contrastive.encoder import SeqEncoder
from clclm_jax.data import auxtasks, nextitem
from clclm_jax.data import candidates as cd
from clclm_jax.model import generate as generate_lib
from clclm_jax.seqrec import candidates as cs
from clclm_jax.seqrec import unified
from clclm_jax.train import sharding, trainer
from clclm_jax.train.errors import ConfigError
import train_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
TITLES = [f"title {w}" for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
                                 "juliet", "kilo", "lima")] + [f"long title number {i} with words" for i in range(13, 41)]
HISTORIES = [(1, 2, 3, 4, 5, 6), (7, 8, 9, 10, 11), (12, 1, 3, 5, 7, 9, 2), (4, 6, 8, 10, 12, 13, 14),
             (15, 16, 17, 18), (2, 4, 19, 20, 21, 22, 23)]
SETTINGS = auxtasks.TaskSettings(max_history=3, num_candidates=5, mim_max_masks=2, mlm_max_words=4,
                                 mlm_mask_rate=0.5)
LAYOUT = cd.Layout(max_history=3, max_prompt_tokens=512, max_item_tokens=16, pad_multiple=32, answer_lines=2,
                   max_items=auxtasks.max_items(auxtasks.TASKS, SETTINGS))
PH = 188  # the byte tokenizer's NUL byte (configs/tiny_cand.py:unified): no title holds it


@pytest.fixture(scope="module")
def toy():
  """Toy data, its prompt tokens with the placeholder, and a float `UnifiedRec` (tiny Llama, active LoRA, a random
  4-wide encoder) with a non-trivial projector."""
  data = nextitem.from_histories("toy", "movie", HISTORIES, TITLES)
  tok, llm = train_helpers.byte_llm()
  encoder = SeqEncoder(data.num_items + 2, hidden=8, num_layers=1, num_heads=2, max_len=8, dropout=0.0,
                       attn_dropout=0.0, rngs=nnx.Rngs(1))
  model = unified.UnifiedRec(llm, encoder, unified.UnifiedSettings(PH, "last", 0.2, 0.3), 16, rngs=nnx.Rngs(3))
  return data, tok, cd.PromptTokens(data, tok, LAYOUT.max_item_tokens, PH), model


def _prompts(data, n=4, seed=0):
  xs = cd.candidate_examples(data, "test", num_candidates=5, seed=seed)[:n]
  return xs, [cd.rec_prompt(data, x, LAYOUT.max_history) for x in xs]


def test_one_soft_token_per_item_at_its_placeholder(toy):
  data, tok, pt, model = toy
  xs, prompts = _prompts(data)
  mim = auxtasks.make_prompt("mim", data, nextitem.examples(data, "train")[3], np.random.default_rng(0), SETTINGS)
  prompts.append(mim)
  soft = [True, False, True, True, True]
  batch = cd.train_batch(pt, prompts, LAYOUT, soft)
  for r, (p, s) in enumerate(zip(prompts, soft)):
    tokens = batch["tokens"][r]
    items = [x for x in p.lines if isinstance(x, int)]
    slots = np.flatnonzero(tokens == PH)
    assert len(slots) == (len(items) if s else 0)  # exactly one per item line, none in a text-only row
    assert tok.decode(tokens[batch["loss_mask"][r] > 0]).count(chr(0)) == 0  # answers hold none
    np.testing.assert_array_equal(batch["item_ids"][r, :len(items)], items)
    assert not batch["item_ids"][r, len(items):].any()
    np.testing.assert_array_equal(batch["soft_item_ids"][r], batch["item_ids"][r] * s)
    for j, item in enumerate(items):
      span = np.flatnonzero(batch["item_slot"][r] == j + 1)
      assert tok.decode(tokens[span]) == tok.decode(pt.titles[item - 1])  # the (cut) title's tokens, nothing else
      if s:  # the placeholder follows the title, then the line's newline
        assert slots[j] == span[-1] + 1 and tok.decode(tokens[slots[j] + 1:slots[j] + 2]) == "\n"
    if p.task == "rec":
      hist = list(xs[r].history[-3:])
      assert batch["user_valid"][r] == 1 and batch["history_ids"][r, -len(hist):].tolist() == hist
      text = tok.decode(tokens[batch["history_mask"][r] > 0]).replace(chr(0), "")
      assert text == "\n".join(tok.decode(pt.titles[i - 1]) for i in hist)
    else:
      assert batch["user_valid"][r] == 0 and not batch["history_mask"][r].any()
  seen = [i for i, v in zip(batch["item_ids"].ravel(), batch["item_valid"].ravel()) if v]
  assert sorted(seen) == sorted(set(batch["item_ids"].ravel()) - {0})  # each item once
  # The model: each placeholder's input is its item's projected ID embedding; every other input is the token's.
  x = np.asarray(model.inputs_embeds(jnp.asarray(batch["tokens"]), jnp.asarray(batch["soft_item_ids"])))
  plain = np.asarray(model.llm.embed(jnp.asarray(batch["tokens"])))
  ids = np.asarray(model.item_embeds(jnp.asarray(batch["item_ids"])))
  for r, s in enumerate(soft):
    slots = np.flatnonzero(batch["tokens"][r] == PH)
    np.testing.assert_array_equal(np.delete(x[r], slots, 0), np.delete(plain[r], slots, 0))
    np.testing.assert_allclose(x[r, slots], ids[r, :len(slots)], rtol=1e-6)
  text_row = batch["tokens"][1:2]  # without soft items the model is its LLM
  np.testing.assert_array_equal(np.asarray(model.hidden_states(jnp.asarray(text_row))),
                                np.asarray(model.llm.hidden_states(jnp.asarray(text_row))))


@nnx.jit
def _logits(model, tokens_bt, mask_bt, soft_bk):
  return model.lm_logits(model.hidden_states(tokens_bt, None, mask_bt, soft_item_ids_bk=soft_bk))


def test_scores_and_generation_read_the_unified_prompt(toy):
  data, tok, pt, model = toy
  xs, prompts = _prompts(data, 3)
  got = cs.candidate_scores(model, pt, data, xs, LAYOUT, batch_size=2, soft=True)  # cached prefill, padded call
  rows = [(u, c, pt.prompt(p, True), pt.lines([item]), cd.soft_item_ids([p], LAYOUT.max_items)[0])
          for u, (x, p) in enumerate(zip(xs, prompts)) for c, item in enumerate(x.candidates)]
  width = max(len(h) + len(a) for _, _, h, a, _ in rows)
  tokens, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
  for r, (_, _, h, a, _) in enumerate(rows):
    tokens[r, :len(h) + len(a)], mask[r, :len(h) + len(a)] = np.r_[h, a], 1
  logits = np.asarray(_logits(model, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray([r[4] for r in rows])),
                      np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = np.zeros((3, 5))
  for r, (u, c, h, a, _) in enumerate(rows):
    want[u, c] = sum(logp[r, len(h) + j - 1, t] for j, t in enumerate(a))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)
  text = cs.candidate_scores(model, pt, data, xs, LAYOUT, batch_size=2)
  assert np.abs(text - got).max() > 1e-3  # the soft tokens change the scores
  # Greedy generation of the unified prompts: each token is the full forward's best (never the placeholder).
  ids = cd.soft_item_ids(prompts, LAYOUT.max_items)
  heads = [pt.prompt(p, True) for p in prompts]
  g = generate_lib.generate(unified.SoftPrompted(model, ids), tok, heads, max_new_tokens=3, pad_to_multiple_of=32,
                            stop_token_ids=[])
  for u, h in enumerate(heads):
    seq = list(h)
    for t in g.tokens_brn[u, 0]:
      step = np.array(_logits(model, jnp.asarray([seq]), jnp.ones((1, len(seq)), jnp.int32),
                                jnp.asarray(ids[u:u + 1])))[0, -1]
      step[PH] = -np.inf
      assert t == int(np.argmax(step))
      seq.append(int(t))
  answers = cs.generate_answers(model, pt, data, xs, LAYOUT, batch_size=2, soft=True)
  assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def _sequence_logp(model, heads, ids, tokens_rn):
  """Sum of log p of each row's generated tokens after its prompt under a full forward with `ids`' soft items (the
  placeholder never generated: its logit is -inf), in float64."""
  width = 512  # one shape: one compile
  tokens, mask = np.zeros((len(heads), width), np.int32), np.zeros((len(heads), width), np.int32)
  for r, (h, t) in enumerate(zip(heads, tokens_rn)):
    tokens[r, :len(h) + len(t)], mask[r, :len(h) + len(t)] = np.r_[h, t], 1
  logits = np.asarray(_logits(model, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ids)), np.float64)
  logits[..., PH] = -np.inf
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.asarray([sum(logp[r, len(h) + j - 1, x] for j, x in enumerate(t))
                     for r, (h, t) in enumerate(zip(heads, tokens_rn))])


def test_beams_and_samples_of_unified_prompts_read_their_own_soft_items(toy):
  """Beam search and sampling of unified prompts (`SoftPrompted`, whose prefill is one row per prompt before
  `generate` repeats rows): every returned sequence scores as a full forward with its own prompt's soft items,
  not another's; a prompt's beams do not depend on its row in the batch; samples are the key's."""
  data, tok, pt, model = toy
  _, prompts = _prompts(data, 2)
  heads = [pt.prompt(p, True) for p in prompts]
  ids = cd.soft_item_ids(prompts, LAYOUT.max_items)

  def run(rows, **kw):
    return generate_lib.generate(unified.SoftPrompted(model, ids[rows]), tok, [heads[i] for i in rows],
                                 max_new_tokens=3, pad_to_multiple_of=256, stop_token_ids=[], **kw)
  beams = dict(num_beams=3, num_return_sequences=2, length_penalty=0.0)  # no stop, penalty 0: scores are sums
  samples = dict(temperature=1.0, top_p=0.9, num_return_sequences=2, key=jax.random.key(7))
  both, sampled = run([0, 1], **beams), run([0, 1], **samples)
  for g in (both, sampled):
    rows = [(u, t) for u in (0, 1) for t in g.tokens_brn[u]]
    own = _sequence_logp(model, [heads[u] for u, _ in rows], ids[[u for u, _ in rows]], [t for _, t in rows])
    np.testing.assert_allclose(g.scores_br.reshape(-1), own, rtol=1e-4, atol=1e-3)
    other = _sequence_logp(model, [heads[u] for u, _ in rows], ids[[1 - u for u, _ in rows]], [t for _, t in rows])
    assert np.abs(other - own).max() > 1e-2  # the soft items change the scores: each row read its own
  swapped = run([1, 0], **beams)  # each prompt in the other row (the same shape: no second compile)
  np.testing.assert_array_equal(swapped.tokens_brn[::-1], both.tokens_brn)
  np.testing.assert_allclose(swapped.scores_br[::-1], both.scores_br, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(run([0, 1], **samples).tokens_brn, sampled.tokens_brn)  # seeded
  assert not np.array_equal(run([0, 1], **samples | {"key": jax.random.key(8)}).tokens_brn, sampled.tokens_brn)
  bound = unified.SoftPrompted(model, ids)  # two prompts' soft items, a prefill of three rows
  with pytest.raises(ValueError, match="one row per prompt"):
    bound.decode(jnp.asarray(np.repeat(np.asarray(heads[0])[None], 3, 0)), bound.init_cache(3, len(heads[0])), 0)


def _project(model, z):
  """The projector in numpy: Linear, GELU (tanh), Linear, RMS-scaled to the token embeddings."""
  p = model.projector
  h = z @ np.asarray(p.up_proj.kernel[...]) + np.asarray(p.up_proj.bias[...])
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  y = h @ np.asarray(p.down_proj.kernel[...]) + np.asarray(p.down_proj.bias[...])
  return y / np.sqrt((y * y).mean(-1, keepdims=True) + 1e-6) * p.out_rms


def test_contrastive_losses_equal_numpy_references(toy):
  data, _, pt, model = toy
  xs, prompts = _prompts(data, 4)
  prompts[2] = auxtasks.make_prompt("bpr", data, nextitem.examples(data, "train")[5], np.random.default_rng(1),
                                    SETTINGS)  # a row with no user to align
  batch = {k: jnp.asarray(v) for k, v in cd.train_batch(pt, prompts, LAYOUT, [True, False, True, True]).items()}
  h = model.hidden_states(batch["tokens"], None, batch["attention_mask"], soft_item_ids_bk=batch["soft_item_ids"])
  terms = unified.answer_terms(model, batch, None, (cs.LOSS, unified.USER_CL, unified.ITEM_CL), cs.LOSS)
  hn, b = np.asarray(h, np.float64), {k: np.asarray(v) for k, v in batch.items()}
  # user_cl: the mean state over the history lines against the encoder's (last-pooled) user state, projected.
  m = b["history_mask"][..., None]
  text = (hn * m).sum(1) / np.maximum(m.sum(1), 1)
  user = np.asarray(model.encoder.encode(batch["history_ids"], pooling="last"), np.float64)
  want = train_helpers.nt_xent(text, _project(model, user), 0.2, valid_n=b["user_valid"] > 0)
  np.testing.assert_allclose(float(terms[unified.USER_CL]), want, rtol=1e-4)
  # item_cl: each item line's mean title state against its projected item-table row, each item once.
  k = b["item_ids"].shape[1]
  titles = np.stack([[hn[r, b["item_slot"][r] == j + 1].mean(0) if (b["item_slot"][r] == j + 1).any()
                      else np.zeros(hn.shape[-1]) for j in range(k)] for r in range(len(prompts))])
  table = np.asarray(model.encoder.item_table(), np.float64)
  ids = _project(model, table[b["item_ids"]])
  d = hn.shape[-1]
  want = train_helpers.nt_xent(titles.reshape(-1, d), ids.reshape(-1, d), 0.3, valid_n=b["item_valid"].reshape(-1) > 0)
  np.testing.assert_allclose(float(terms[unified.ITEM_CL]), want, rtol=1e-4)
  # CLIP's form (`unified.same_side_negatives=False`): the same pairs, negatives from the other side only.
  clip = dataclasses.replace(model.settings, same_side_negatives=False)
  model.settings, kept = clip, model.settings
  try:
    clip_terms = unified.answer_terms(model, batch, None, (unified.USER_CL, unified.ITEM_CL), cs.LOSS)
  finally:
    model.settings = kept
  np.testing.assert_allclose(float(clip_terms[unified.ITEM_CL]), train_helpers.nt_xent(
      titles.reshape(-1, d), ids.reshape(-1, d), 0.3, valid_n=b["item_valid"].reshape(-1) > 0, same_side=False),
      rtol=1e-4)
  np.testing.assert_allclose(float(clip_terms[unified.USER_CL]), train_helpers.nt_xent(
      text, _project(model, user), 0.2, valid_n=b["user_valid"] > 0, same_side=False), rtol=1e-4)
  # the registered losses compute the same from the one forward; no gradient reaches the encoder
  grads = nnx.grad(lambda m: sum(cs.answer_losses(m, batch, None, (unified.USER_CL, unified.ITEM_CL)).values()))(
      model)
  assert not any(np.asarray(g).any() for g in jax.tree.leaves(nnx.state(grads.encoder)))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(nnx.state(grads.projector)))


def test_curriculum_share_rises_from_0_to_1_seeded_and_resumable(toy):
  data, _, pt, _ = toy
  share = unified.soft_share(5, True)
  assert [share(t) for t in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert unified.soft_share(5, False)(0) == 1.0
  examples = nextitem.examples(data, "train")
  ratios = {"rec": 1.0, "bpr": 1.0}

  def source(seed):
    return auxtasks.train_batches(data, pt, examples, ratios, 4, LAYOUT, SETTINGS, seed, soft_share=share)

  src = source(7)
  batches = [next(src) for _ in range(5)]  # crosses an epoch (len(examples) // 4 batches an epoch)
  soft_rows = [int((b["soft_item_ids"] > 0).any(1).sum()) for b in batches]
  assert soft_rows == [0, 1, 2, 3, 4]  # round(share * 4) rows of 4
  for b in batches:
    has_slot = (b["tokens"] == PH).any(1)
    np.testing.assert_array_equal(has_slot, (b["soft_item_ids"] > 0).any(1))
  again = source(7)
  next(again)
  state = json.loads(json.dumps(again.get_state()))
  resumed = source(7)
  resumed.set_state(state)
  for want in batches[1:]:
    got = next(resumed)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
  other = source(8)
  others = [next(other) for _ in range(5)]
  assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, others))


def test_bad_unified_config_gets_one_line_errors(toy, tmp_path):
  from configs import tiny_cand  # pylint: disable=g-import-not-at-top
  data, _, _, model = toy
  cases = [("projector_hidden", 0, "config.unified.projector_hidden=0"),
           ("loss_weights", {"answer_lm": 1.0, "align": 1.0}, r"config.unified.loss_weights names unknown .*align"),
           ("loss_weights", {"answer_lm": 0.0, "user_cl": 0.0, "item_cl": 0.0}, "one above 0"),
           ("encoder_config", "pretrain_beauty", "config.unified.encoder_config='pretrain_beauty' pretrains on"),
           ("encoder_config", "nope", r"config.unified.encoder_config='nope': no configs/nope.py"),
           ("encoder_overrides", {"width": 3}, "config.unified.encoder_overrides names 'width'"),
           ("placeholder", "<not a token>", r"config.unified.placeholder='<not a token>' is not one token"),
           ("placeholder", "t", r"config.unified.placeholder='t': item 1's title holds it")]
  for field, value, message in cases:
    c = tiny_cand.get_config("unified")
    with c.unlocked():
      c.unified[field] = value
    with pytest.raises(ConfigError, match=message) as e:
      cs.train(c, tmp_path / "run", data=data)
    assert "\n" not in str(e.value)
  assert not (tmp_path / "run" / "encoder").exists()  # stopped before the encoder trained
  # An item without an ID embedding: the encoder's table ends before the catalogue does.
  small = SeqEncoder(data.num_items + 1, hidden=8, num_layers=1, num_heads=2, max_len=8, rngs=nnx.Rngs(0))
  c = tiny_cand.get_config("unified")
  with pytest.raises(ConfigError, match=r"config.unified.encoder_config='pretrain_ml100k': item 40 \('long title "
                     r"number 40 with words'\) has no ID embedding") as e:
    unified.build_model(c, model.llm, small, unified.encoder_config(c), PH, data)
  assert "\n" not in str(e.value)


def _params(model, part):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(getattr(model, part)))]


def test_projector_trains_in_stage_2_only(toy, tmp_path):
  from configs import tiny_cand  # pylint: disable=g-import-not-at-top
  data = toy[0]
  c = tiny_cand.get_config("unified")
  c.data.max_users, c.data.valid_size, c.data.test_size = 0, 4, 4
  c.candidates.steps, c.unified.steps = 2, 2
  c.unified.encoder_overrides.batch_size = 2  # 6 toy users
  r = cs.build(c, data, tmp_path)
  encoder, text, soft = cs.stages(r, tmp_path)
  assert (encoder.name, text.name, soft.name) == ("pretrain toy", "text", "unified")
  assert encoder.module.encoder is r.model.encoder  # the encoder's pretraining trains the model's encoder
  before = {p: _params(r.model, p) for p in ("projector", "encoder")}
  lora = lambda: [np.asarray(x) for x in jax.tree.leaves(nnx.state(r.model, nnx.LoRAParam))]  # noqa: E731
  lora0 = lora()
  trainer.run([text], r.model, r.mesh, log=lambda _: None)
  assert all(np.array_equal(a, b) for a, b in zip(before["projector"], _params(r.model, "projector")))
  lora1 = lora()
  assert any(not np.array_equal(a, b) for a, b in zip(lora0, lora1))
  trainer.run([text, soft], r.model, r.mesh, log=lambda _: None)
  assert any(not np.array_equal(a, b) for a, b in zip(before["projector"], _params(r.model, "projector")))
  assert any(not np.array_equal(a, b) for a, b in zip(lora1, lora()))
  assert all(np.array_equal(a, b) for a, b in zip(before["encoder"], _params(r.model, "encoder")))
  rows = [json.loads(x) for x in (tmp_path / "unified" / "metrics.jsonl").read_text().splitlines()]
  assert {"train/loss/answer_lm", "train/loss/user_cl", "train/loss/item_cl"} <= set(rows[-1])


def test_unified_runs_differing_in_stage_2_share_one_stage_1(toy, tmp_path):
  """A run naming a finished stage 1 in `unified.text_workdir` restores it and ends exactly where the same run
  training its own stage 1 does; a text-only run naming the folder trains the same stage 1; a run whose stage 1
  differs stops naming the field; the shared folder is locked while a run uses it."""
  from configs import tiny_cand  # pylint: disable=g-import-not-at-top
  data = toy[0]

  def config(shared: bool, **weights):
    c = tiny_cand.get_config("unified")
    c.data.max_users, c.data.valid_size, c.data.test_size = 0, 2, 0
    c.candidates.steps, c.unified.steps = 2, 2
    c.unified.encoder_overrides.batch_size = 2  # 6 toy users
    c.unified.encoder_workdir = str(tmp_path / "encoder")  # pretrained once for every run here
    c.unified.text_workdir = str(tmp_path / "shared") if shared else ""
    c.unified.loss_weights.update(weights)
    return c

  cs.train(config(True, user_cl=0.0), tmp_path / "a", log=lambda _: None, data=data)
  said: list[str] = []
  cs.train(config(True, item_cl=0.0), tmp_path / "b", log=said.append, data=data)
  assert any(x.startswith("text: finished before (step 2)") for x in said) and not (tmp_path / "b" / "text").exists()
  cs.train(config(False, item_cl=0.0), tmp_path / "own", log=lambda _: None, data=data)
  assert (tmp_path / "own" / "text" / "metrics.jsonl").is_file()
  rows = lambda run: [json.loads(x) for x in  # noqa: E731
                      (tmp_path / run / "unified" / "metrics.jsonl").read_text().splitlines()]
  drop = lambda row: {k: v for k, v in row.items() if "time" not in k and "per_s" not in k}  # noqa: E731
  assert [drop(x) for x in rows("b")] == [drop(x) for x in rows("own")] and len(rows("b")) == 2
  # A text-only run naming a folder trains there the stage 1 that unified runs restore: the same batches and losses.
  text = tiny_cand.get_config()
  text.data.max_users, text.data.valid_size, text.data.test_size = 0, 2, 0
  text.candidates.steps = 2
  text.unified.text_workdir = str(tmp_path / "from_text")
  cs.train(text, tmp_path / "t", log=lambda _: None, data=data)
  stage_rows = lambda folder: [drop(json.loads(x)) for x in  # noqa: E731
                               (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
  assert not (tmp_path / "t" / "checkpoints").exists() and len(stage_rows("from_text")) == 2
  assert stage_rows("from_text") == stage_rows("own/text")
  later = config(True)
  later.unified.text_workdir = str(tmp_path / "from_text")
  said.clear()
  cs.train(later, tmp_path / "e", log=said.append, data=data)
  assert any(x.startswith("text: finished before (step 2)") for x in said)
  other = config(True)
  other.candidates.steps = 3  # another stage 1
  with pytest.raises(ConfigError, match=r"shared holds a run with another config \(candidates.steps: 2 in the run"):
    cs.train(other, tmp_path / "c", log=lambda _: None, data=data)
  with trainer.RunLock(tmp_path / "shared"):
    with pytest.raises(ConfigError, match=r"shared is in use by process"):
      cs.train(config(True), tmp_path / "d", log=lambda _: None, data=data)


def test_sigterm_in_encoder_pretraining_saves_returns_and_resumes(toy, tmp_path, monkeypatch):
  """As at every other stage: the pretraining saves, `train` returns its preempted summary (no exception), and the
  same call goes on from the saved step."""
  from configs import tiny_cand  # pylint: disable=g-import-not-at-top
  data = toy[0]
  c = tiny_cand.get_config("unified")
  c.data.max_users, c.data.valid_size, c.data.test_size = 0, 2, 0
  c.candidates.steps = c.unified.steps = 0  # the encoder, then the untrained unified model's valid score: quick
  c.unified.encoder_overrides.batch_size = 2  # 6 toy users: a few steps an epoch
  run_stage = trainer.run_stage

  def preempted(stage, model, mesh):
    if stage.name.startswith("pretrain"):
      term = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
      stage = dataclasses.replace(stage, batches=lambda b=stage.batches: train_helpers.DiesAt(b(), 2, term))
    return run_stage(stage, model, mesh)
  monkeypatch.setattr(trainer, "run_stage", preempted)
  summary = cs.train(c, tmp_path, log=lambda _: None, data=data)
  assert summary["preempted"] and summary["stage"] == "pretrain toy" and summary["steps"] == 2
  assert "preempted at step 2 of pretrain toy: run the same command again" in cs.format_summary(summary)
  assert (tmp_path / "encoder" / "checkpoints" / "latest" / "2").is_dir() and not (tmp_path / cs.SUMMARY).exists()
  monkeypatch.setattr(trainer, "run_stage", run_stage)
  done = cs.train(c, tmp_path, log=lambda _: None, data=data)
  steps = [json.loads(x)["step"] for x in (tmp_path / "encoder" / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, done["unified"]["encoder"]["steps"] + 1)) and steps[-1] > 2  # resumed, not redone
  assert not done.get("preempted") and (tmp_path / cs.SUMMARY).is_file() and done["valid"]["count"] == 2
  # The resumed pretraining ends where an uninterrupted one does: the same best step, metric and parameters.
  mesh = sharding.make_mesh(c.mesh)
  resumed, _, again = unified.pretrained_encoder(c, data, tmp_path, mesh, log=lambda _: None)  # restored
  c.unified.encoder_workdir = str(tmp_path / "uninterrupted")
  straight, _, once = unified.pretrained_encoder(c, data, tmp_path, mesh, log=lambda _: None)
  assert not once["preempted"] and once["steps"] == again["steps"] == done["unified"]["encoder"]["steps"]
  assert once["best_step"] == again["best_step"] and once["valid_NDCG@10"] == again["valid_NDCG@10"]
  for a, b in zip(jax.tree.leaves(nnx.state(resumed)), jax.tree.leaves(nnx.state(straight))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiny_unified_config_trains_through_train_py(data_root, tmp_path):
  run = subprocess.run([sys.executable, "train.py", "--config=configs/tiny_cand.py:unified",  # answers sampled
                        "--config.eval.temperature=0.8", f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  summary = json.loads((tmp_path / cs.SUMMARY).read_text())
  assert [s["stage"] for s in summary["stages"]] == ["text", "unified"]
  assert summary["unified"]["encoder"]["steps"] > 0 and summary["unified"]["curriculum"] is True
  assert {cs.SCORED, cs.HIT, cs.VALID} <= set(summary["test"])
  assert "unified prompts" in run.stdout and (tmp_path / "encoder" / "stage.json").is_file()


def test_cand_table_goals_are_the_issues_per_dataset():
  """MovieLens: LLaRA's bar and both intervals for the best unified row; Beauty: all auxiliary tasks against text."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import cand_table  # pylint: disable=g-import-not-at-top

  def row(dataset, name, hits, valid=1.0):
    h = np.asarray(hits, np.float64)
    return {"dataset": dataset, "row": name, "label": cand_table.LABELS[name], "count": len(h),
            "users": list(range(len(h))), "hits": [h.tolist()], "full_recipe": True, "budget": {},
            "metrics": {cs.HIT: h.mean(), cs.VALID: valid, cs.SCORED: h.mean()}}
  won, lost, half = [1] * 40, [0] * 40, [1, 0] * 20
  rows = cand_table.with_intervals([
      row("ml100k", "text", lost), row("ml100k", "id_encoder", half), row("ml100k", "unified", won),
      row("ml100k", "unified_no_user_cl", won, valid=0.9),
      row("beauty", "text", half), row("beauty", "unified", won), row("beauty", "text+aux", won),
      row("beauty", "unified+aux", lost)], resamples=200)
  lines = cand_table.goal_lines(rows)
  assert len(lines) == 3 and all("(**budget** row)" not in x for x in lines)
  assert lines[0].startswith("- ml100k, 40 users, best unified row `unified prompts") and lines[0].endswith("**met**")
  assert lines[1].startswith("- beauty, 40 users, `text-only + all auxiliary tasks`") and lines[1].endswith("**met**")
  assert lines[2].startswith("- beauty, 40 users, `unified + all auxiliary tasks`") and lines[2].endswith("missed")
  # Rows of another training budget stand beside each other; each compares to the text-only row trained alike.
  budget = lambda r, **b: r | {"budget": b, "full_recipe": False}  # noqa: E731
  rows = cand_table.with_intervals([
      row("ml100k", "text", won), budget(row("ml100k", "text", lost), steps=30),
      budget(row("ml100k", "unified", half), steps=30), row("ml100k", "unified", lost),
      budget(row("ml100k", "id_encoder", won), **{"encoder.num_epochs": 1}), row("ml100k", "id_encoder", half)],
      resamples=200)
  assert len({cand_table.row_key(r) for r in rows}) == 6
  assert [r["vs_text"]["difference"] for r in rows if r["row"] == "unified"] == [0.5, -1.0]
  assert [r["vs_id"]["difference"] for r in rows if r["row"] == "unified"] == [0.0, -0.5]


def test_cand_table_on_tiny_models_marks_the_budget_and_pairs_users(data_root, tmp_path):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import cand_table  # pylint: disable=g-import-not-at-top
  argv = ["--config=tiny_cand:unified", "--datasets=ml100k", "--rows=popularity,id_encoder,text,unified+bpr",
          "--seeds=0",
          "--steps=1", "--users=6", f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path}", "--resamples=200"]
  result = cand_table.main(argv)
  rows = {r["row"]: r for r in result["rows"]}
  assert set(rows) == {"popularity", "id_encoder", "text", "unified+bpr"}
  assert rows["text"]["users"] == rows["unified+bpr"]["users"] == rows["id_encoder"]["users"]  # paired
  assert rows["popularity"]["users"] == rows["text"]["users"]
  # Popularity's answer is the candidate most often in the training histories (the earlier one on a tie).
  data = cand_table.nextitem.load("ml100k")
  counts = cand_table.baselines.popularity_scores(data)
  test = {x.user: x for x in cand_table.cand_data.candidate_examples(data, "test", num_candidates=5, seed=0)}
  want = [float(max(test[u].candidates, key=lambda i: counts[i - 1]) == test[u].target)
          for u in rows["popularity"]["users"]]
  assert rows["popularity"]["hits"] == [want] and rows["popularity"]["metrics"]["HitRatio@1"] == np.mean(want)
  assert all(r["count"] == 6 and not r["full_recipe"] and not r["all_users"] and r["budget"] == {"steps": 1, "users": 6}
             for r in rows.values())
  for name in ("id_encoder", "unified+bpr"):
    vs = rows[name]["vs_text"]
    want = np.mean(rows[name]["hits"]) - np.mean(rows["text"]["hits"])
    assert vs["difference"] == pytest.approx(want) and vs["ci95"][0] <= want <= vs["ci95"][1]
  assert "vs_text" not in rows["text"] and "vs_id" not in rows["id_encoder"]
  assert rows["unified+bpr"]["vs_id"]["difference"] == pytest.approx(
      np.mean(rows["unified+bpr"]["hits"]) - np.mean(rows["id_encoder"]["hits"]))
  # The LLM's steps and users leave the encoder's pretraining alone: one encoder folder for every such budget.
  assert pathlib.Path(rows["id_encoder"]["runs"][0]["folder"]) == tmp_path / "runs" / "ml100k" / "encoder" / "recipe"
  stages = rows["unified+bpr"]["runs"][0]["stages"]
  assert [s["stage"] for s in stages] == ["text", "unified"] and all(s["steps"] == 1 for s in stages)
  # The text-only training of each task mixture lives in one folder: the text row's model, the unified rows' stage 1.
  assert [s["stage"] for s in rows["text"]["runs"][0]["stages"]] == ["text"]
  for name in ("text_stage", "text_stage_plus_bpr"):
    assert (tmp_path / "runs" / "ml100k" / name / "steps1" / "seed0" / "checkpoints").is_dir()
  assert rows["unified+bpr"]["metrics"][cand_table.cs.HIT] == pytest.approx(np.mean(rows["unified+bpr"]["hits"]))
  md = (tmp_path / "cand_table.md").read_text()
  assert "**budget**: steps=1, users=6" in md and "text-only + bpr" not in md and "unified + bpr" in md
  assert "best unified row `unified + bpr` (**budget** row)" in md
  # Another number of users is another table: it joins the file beside the 6-user rows, replacing none of them.
  again = cand_table.main([*(x for x in argv if not x.startswith(("--rows", "--users"))), "--rows=id_encoder",
                           "--users=4"])
  assert sorted((r["row"], r["count"]) for r in again["rows"]) == [("id_encoder", 4), ("id_encoder", 6),
                                                                   ("popularity", 6), ("text", 6), ("unified+bpr", 6)]
  # The interval: a row better on every resample is above zero; the same row against itself is exactly zero.
  a, b = np.ones((1, 50)), np.r_[np.zeros(25), np.ones(25)][None]
  assert cand_table.paired_interval(a, b, resamples=100)["ci95"][0] > 0
  assert cand_table.paired_interval(b, b, resamples=100)["ci95"] == [0.0, 0.0]
