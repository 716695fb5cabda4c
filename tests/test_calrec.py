"""CALRec: token batches and their spans, the three losses against numpy, the resumable batch source, the
evaluation entry points, full fine-tuning, the auxiliary-task rows a `tasks` block mixes in, and the tiny config's
two stages through the one trainer, killed and resumed."""

import collections
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from clclm_jax.contrastive import losses
from clclm_jax.data import auxtasks, nextitem, nextitem_tokens
from clclm_jax.data import candidates as cd
from clclm_jax.data.nextitem_tokens import Layout
from clclm_jax.model.llama import Frozen
from clclm_jax.seqrec import calrec, retrieval
from clclm_jax.train import step as step_lib, trainer
from clclm_jax.train.errors import ConfigError
import train_helpers

TITLES = ["red lipstick", "black mascara", "red blush", "rose toner", "vitamin serum", "matte primer",
          "green tea mask", "lip balm", "eye cream", "nail polish"]
HISTORIES = [(1, 2, 3, 4, 5), (2, 3, 1, 6), (7, 8, 9, 10, 1, 2), (4, 5, 6, 7), (9, 3, 2, 8, 1)]
LAYOUT = Layout(max_history=3, max_prompt_tokens=200, max_item_tokens=32, pad_multiple=32)


@pytest.fixture(scope="module")
def toy():
  """A toy catalogue, the byte tokenizer, its ItemTokens and a tiny float Llama with LoRA (B random, so the
  adapters act)."""
  data = nextitem.from_histories("toy", "product", HISTORIES, [f"{t} {i}" for i, t in enumerate(TITLES)])
  tok, llm = train_helpers.byte_llm()
  return data, tok, nextitem_tokens.item_tokens(data, tok, LAYOUT.max_item_tokens), llm


@nnx.jit
def hidden(llm, tokens_bt, mask_bt):
  """Jitted: eager calls would compile the layer scan at every call."""
  return llm.hidden_states(tokens_bt, None, mask_bt)


@functools.partial(nnx.jit, static_argnums=(2,))
def loss_terms(model, batch, names):
  return calrec.calrec_losses(model, batch, None, names)


def toy_batch(toy, examples=None):
  data, _, it, _ = toy
  examples = examples or [nextitem.Example(u, h[:-1], h[-1]) for u, h in enumerate(HISTORIES)]
  return nextitem_tokens.train_batch(it, examples, LAYOUT), examples


def masked_mean(h_btd, mask_bt):
  m = np.asarray(mask_bt, np.float64)[..., None]
  return (np.asarray(h_btd, np.float64) * m).sum(1) / np.maximum(m.sum(1), 1)


def test_spans_decode_to_the_rendered_text(toy):
  data, tok, it, _ = toy
  batch, examples = toy_batch(toy)
  dec = lambda row, mask: tok.decode(batch["tokens"][row][mask[row] > 0])  # noqa: E731
  for r, ex in enumerate(examples):
    prompt, target = nextitem.render_example(data, ex, max_history=LAYOUT.max_history)
    assert dec(r, batch["history_mask"]) == prompt  # the prompt after <s>
    assert batch["tokens"][r, 0] == tok.bos_token_id and batch["history_mask"][r, 0] == 0
    assert dec(r, batch["target_mask"]) == target
    assert dec(r, batch["loss_mask"]) == target + "\n"  # the newline that teaches to stop
    cue_at = np.flatnonzero(batch["cue_mask"][r])  # one position: the last token of the lines' shared opening
    start = np.flatnonzero(batch["target_mask"][r])[0]
    assert len(cue_at) == 1 and tok.decode(batch["tokens"][r, start:cue_at[0] + 1]) == tok.decode(it.cue)
    idx = batch["target_index"][r][batch["target_index"][r] > 0]
    np.testing.assert_array_equal(idx, np.flatnonzero(batch["loss_mask"][r]))
    item_row = batch["item_tokens"][r]
    assert tok.decode(item_row[batch["item_mask"][r] > 0]) == target
    assert tok.decode(item_row[batch["item_attention"][r] > 0]) == "<s>" + target
  assert batch["tokens"].shape[1] % LAYOUT.pad_multiple == 0
  assert batch["contrastive_valid"].tolist() == [1, 1, 1, 1, 1]
  assert tok.decode(it.cue).startswith("Title:")  # every line opens with it; titles differ from the next token on


def test_prompt_keeps_the_most_recent_items_that_fit(toy):
  data, tok, it, _ = toy
  history = HISTORIES[2]
  assert nextitem_tokens.kept_history(it, history, LAYOUT) == history[-3:]  # max_history
  tight = dataclasses.replace(LAYOUT, max_prompt_tokens=it.fixed_prompt_tokens + len(it.lines[1]) + 1)
  assert nextitem_tokens.kept_history(it, history, tight) == history[-1:]  # only the last item fits
  ids = nextitem_tokens.prompt_ids(it, history, tight)
  assert len(ids) <= tight.max_prompt_tokens
  assert tok.decode(ids[1:]) == nextitem.render_prompt(data, history, max_history=1)
  long = nextitem_tokens.item_tokens(data, tok, 4)  # item lines cut at 4 tokens
  assert all(len(x) <= 4 for x in long.lines) and long.target_width == 5


def test_span_pooling_equals_hand_computation_and_the_inference_user_tower(toy):
  _, _, it, llm = toy
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
  np.testing.assert_allclose(losses.masked_mean(h, mask), masked_mean(h, mask), rtol=1e-6)
  np.testing.assert_allclose(losses.masked_mean(h, mask)[0], (h[0, 1] + h[0, 2]) / 2, rtol=1e-6)
  batch, examples = toy_batch(toy)
  v_u_joint = losses.masked_mean(hidden(llm, batch["tokens"], batch["attention_mask"]), batch["history_mask"])
  v_u = calrec.encode_users(llm, it, [ex.history for ex in examples], LAYOUT, batch_size=4)  # prompts alone
  np.testing.assert_allclose(v_u, v_u_joint, rtol=2e-4, atol=2e-5)
  cue = np.asarray([np.flatnonzero(m).max() + len(it.cue) for m in batch["history_mask"]])  # after `Title:`
  h_joint = np.asarray(hidden(llm, batch["tokens"], batch["attention_mask"]))
  np.testing.assert_allclose(calrec.user_pool(h_joint, batch, "cue"), h_joint[np.arange(len(cue)), cue], rtol=1e-6)
  v_cue = calrec.encode_users(llm, it, [ex.history for ex in examples], LAYOUT, batch_size=4, pooling="cue")
  np.testing.assert_allclose(v_cue, h_joint[np.arange(len(cue)), cue], rtol=2e-4, atol=2e-5)  # prompt + cue alone
  v_t = calrec.encode_items(llm, it, [ex.target for ex in examples], batch_size=4)
  v_t_batch = losses.masked_mean(hidden(llm, batch["item_tokens"], batch["item_attention"]), batch["item_mask"])
  np.testing.assert_allclose(v_t, v_t_batch, rtol=2e-4, atol=2e-5)


def test_infonce_terms_equal_numpy_and_ignore_batch_order(toy):
  data, _, it, llm = toy
  examples = [nextitem.Example(u, h[:-1], h[-1]) for u, h in enumerate(HISTORIES)]
  examples.append(nextitem.Example(0, (7, 8), HISTORIES[1][-1]))  # repeats row 1's target: left out of InfoNCE
  batch, _ = toy_batch(toy, examples)
  assert batch["contrastive_valid"].tolist() == [1, 1, 1, 1, 1, 0]
  model = calrec.CALRec(llm, calrec.LossSettings(temperature=0.2))
  terms = loss_terms(model, batch, (calrec.NIG, calrec.TT, calrec.UT))
  h = np.asarray(hidden(llm, batch["tokens"], batch["attention_mask"]))
  h_item = np.asarray(hidden(llm, batch["item_tokens"], batch["item_attention"]))
  v_t, valid = masked_mean(h_item, batch["item_mask"]), batch["contrastive_valid"] > 0
  want_tt = train_helpers.nt_xent(masked_mean(h, batch["target_mask"]), v_t, 0.2, valid_n=valid)
  want_ut = train_helpers.nt_xent(masked_mean(h, batch["history_mask"]), v_t, 0.2, valid_n=valid)
  np.testing.assert_allclose(float(terms[calrec.TT]), want_tt, rtol=1e-5)
  np.testing.assert_allclose(float(terms[calrec.UT]), want_ut, rtol=1e-5)
  perm = np.random.default_rng(1).permutation(len(examples))
  permuted = loss_terms(model, {k: v[perm] for k, v in batch.items()}, (calrec.NIG, calrec.TT, calrec.UT))
  for name in terms:
    np.testing.assert_allclose(float(permuted[name]), float(terms[name]), rtol=1e-5)
  assert set(loss_terms(model, batch, (calrec.NIG,))) == {calrec.NIG}  # no InfoNCE asked: no item-tower pass
  clip = loss_terms(calrec.CALRec(llm, calrec.LossSettings(0.2, same_tower=False)), batch, (calrec.TT, calrec.UT))
  clip_ref = functools.partial(train_helpers.nt_xent, b_nd=v_t, tau=0.2, valid_n=valid, same_side=False)
  np.testing.assert_allclose(float(clip[calrec.TT]), clip_ref(masked_mean(h, batch["target_mask"])), rtol=1e-5)
  np.testing.assert_allclose(float(clip[calrec.UT]), clip_ref(masked_mean(h, batch["history_mask"])), rtol=1e-5)
  cue = loss_terms(calrec.CALRec(llm, calrec.LossSettings(0.2, user_pooling="cue")), batch, (calrec.UT,))
  at_cue = np.asarray([np.flatnonzero(m).max() + len(it.cue) for m in batch["history_mask"]])
  want_cue = train_helpers.nt_xent(h[np.arange(len(h)), at_cue], v_t, 0.2, valid_n=valid)
  np.testing.assert_allclose(float(cue[calrec.UT]), want_cue, rtol=1e-5)


def test_generation_loss_covers_only_target_tokens(toy):
  _, _, _, llm = toy
  batch, _ = toy_batch(toy)
  model = calrec.CALRec(llm, calrec.LossSettings())
  nig = float(loss_terms(model, batch, (calrec.NIG,))[calrec.NIG])
  logits = np.asarray(nnx.jit(lambda m, t, a: m(t, None, a))(llm, batch["tokens"], batch["attention_mask"]),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  b, t = np.nonzero(batch["loss_mask"])
  want = -np.mean(logp[b, t - 1, batch["tokens"][b, t]])
  np.testing.assert_allclose(nig, want, rtol=1e-5)
  assert calrec.NIG in step_lib.PER_TOKEN and calrec.TT not in step_lib.PER_TOKEN
  assert float(step_lib.target_tokens(batch)) == len(b)  # micro-batches weigh by these tokens


def test_batch_source_interleaves_domains_and_resumes_exactly(toy):
  data, tok, it, _ = toy
  other = nextitem.from_histories("toy2", "movie", [(3, 1, 2, 4, 5, 6), (6, 5, 4, 3, 2, 1)], TITLES[:6])
  it2 = nextitem_tokens.item_tokens(other, tok, LAYOUT.max_item_tokens)
  sources = [(it, nextitem.examples(data, "train")), (it2, nextitem.examples(other, "train"))]
  source = nextitem_tokens.train_batches(sources, 2, LAYOUT, seed=3)
  first = [next(source) for _ in range(4)]
  state = source.get_state()
  rest = [next(source) for _ in range(12)]  # crosses epoch boundaries
  again = nextitem_tokens.train_batches(sources, 2, LAYOUT, seed=3)
  again.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
  for a, b in zip(rest, [next(again) for _ in range(12)], strict=True):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  headers = {tok.decode(bt["tokens"][0][:30]) for bt in first + rest}
  assert len(headers) == 2  # both domains' headers; each batch is one domain's
  for bt in first + rest:
    assert len({tok.decode(row[:30]) for row in bt["tokens"]}) == 1
  fresh = nextitem_tokens.train_batches(sources, 2, LAYOUT, seed=3)
  again_first = next(fresh)
  assert all(np.array_equal(first[0][k], again_first[k]) for k in first[0])  # seeded


def test_dense_and_generation_rankings(toy, tmp_path):
  data, tok, it, llm = toy
  examples = nextitem.examples(data, "test")
  lists = calrec.dense_rankings(llm, tok, data, examples, LAYOUT, batch_size=4, tokens=it)
  users = calrec.encode_users(llm, it, [ex.history for ex in examples], LAYOUT, batch_size=4)
  items = calrec.encode_items(llm, it, data.item_ids, batch_size=4)
  want = np.argsort(-retrieval.cosine_scores(users, items), axis=1, kind="stable") + 1
  np.testing.assert_array_equal(lists, want)  # full rankings, best first
  key = {"model": "toy", "weights": calrec.params_digest(llm, nnx.LoRAParam)}
  cached = calrec.dense_rankings(llm, tok, data, examples, LAYOUT, batch_size=4, cache_dir=tmp_path, cache_key=key)
  np.testing.assert_array_equal(cached, lists)
  assert len(list(tmp_path.glob("item_vectors_toy-*.npy"))) == 1
  assert len(list(tmp_path.glob("user_vectors_toy-*.npy"))) == 1
  again = calrec.dense_rankings(llm, tok, data, examples, LAYOUT, batch_size=4, cache_dir=tmp_path, cache_key=key)
  np.testing.assert_array_equal(again, lists)  # read back
  sub = calrec.dense_rankings(llm, tok, data, examples[:2], LAYOUT, batch_size=4, cache_dir=tmp_path, cache_key=key)
  np.testing.assert_array_equal(sub, lists[:2])  # other users: another key, not the first set's vectors
  out = calrec.dense_rankings(llm, tok, data, examples, LAYOUT, k=3, exclude_history=True, batch_size=4)
  assert out.shape == (len(examples), 3)
  assert not any(set(row) & set(ex.history) for row, ex in zip(out.tolist(), examples))
  texts = calrec.generate_items(llm, tok, data, examples, LAYOUT, num_samples=2, temperature=1.0,
                                key=jax.random.key(0), batch_size=4, max_new_tokens=6)
  assert [len(t) for t in texts] == [2] * len(examples) and all("\n" not in s for t in texts for s in t)
  ranked = calrec.rankings_from_texts(data, examples, [["red lipstick"], ["black mascara", "serum"]] * 2
                                      + [["tea"]], exclude_history=False)
  assert ranked[0][:2] == [1, 3] and ranked[1][:2] == [2, 5] and sorted(ranked[0]) == list(range(1, 11))
  gen = calrec.generation_rankings(llm, tok, data, examples[:2], LAYOUT, num_samples=2, temperature=1.0,
                                   key=jax.random.key(1), batch_size=4, max_new_tokens=6, exclude_history=True)
  assert all(len(g) == data.num_items - len(set(ex.history)) and not set(g) & set(ex.history)
             for g, ex in zip(gen, examples[:2]))


def test_rows_without_a_contrastive_pair_give_finite_gradients(toy):
  """Auxiliary rows (`auxtasks.with_aux_rows`) have empty history and target spans (zero vectors) and no pair; a
  micro-batch may hold only such rows. The InfoNCE terms leave them out without a NaN reaching the gradient."""
  _, _, _, llm = toy
  batch, _ = toy_batch(toy)
  model = calrec.CALRec(llm, calrec.LossSettings())
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
  names = (calrec.NIG, calrec.TT, calrec.UT)
  def total(p, b):
    out = step_lib.loss_terms(nnx.merge(graphdef, p, rest), b, None, names)
    return sum(out.values()), out
  grad = jax.jit(jax.grad(total, has_aux=True))
  for aux in ([1, 2, 3, 4], [0, 1, 2, 3, 4]):  # one pair left (its only candidate is its positive: loss 0); none
    b = {k: v.copy() for k, v in batch.items()}
    for k in ("history_mask", "target_mask", "contrastive_valid"):
      b[k][aux] = 0
    grads, out = grad(params, b)
    assert float(out[calrec.TT]) == float(out[calrec.UT]) == 0.0 and np.isfinite(float(out[calrec.NIG]))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves) and any(np.abs(np.asarray(x)).sum() > 0
                                                                         for x in leaves)


def test_full_finetuning_trains_every_float_weight(toy):
  _, _, _, llm = toy
  batch, _ = toy_batch(toy)
  model = calrec.CALRec(llm, calrec.LossSettings())
  graphdef, params, rest = nnx.split(model, calrec.TRAINS["full"], ...)
  loss = lambda p: step_lib.loss_terms(nnx.merge(graphdef, p, rest), batch, None, [calrec.NIG])[calrec.NIG]  # noqa: E731
  grads = jax.jit(jax.grad(loss))(params)
  norms = {"/".join(map(str, path)): float(np.abs(np.asarray(v)).sum()) for path, v in nnx.to_flat_state(grads)}
  for name in ("embed_tokens/embedding", "lm_head/kernel", "norm/weight", "layers/self_attn/q_proj/kernel",
               "layers/mlp/down_proj/kernel", "layers/self_attn/q_proj/lora_a"):
    assert norms[f"llm/{name}"] > 0, name
  assert isinstance(llm.embed_tokens.embedding, Frozen)
  lora_only = nnx.split(model, calrec.TRAINS["lora"], ...)[1]
  assert all("lora" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(lora_only))


def test_config_errors_are_one_line(tmp_path):
  import train  # pylint: disable=g-import-not-at-top
  from configs import calrec_beauty, tiny_calrec  # pylint: disable=g-import-not-at-top
  beauty = calrec_beauty.get_config()
  assert train.data_groups(beauty) == ["beauty", "movie"]  # the target, then the mixture's others
  beauty.calrec.mixture.steps = 0
  assert train.data_groups(beauty) == ["beauty"]  # without the mixture stage its data is not read
  for field, value, message in [("dataset", "sports", "has no item titles"),
                                ("dataset", "nope", "is not a dataset with item text")]:
    c = tiny_calrec.get_config()
    c.data[field] = value
    with pytest.raises(ConfigError, match=f"config.data.{field}={value!r} {message}") as e:
      calrec.train(c, tmp_path / "run")
    assert "\n" not in str(e.value)
  c = tiny_calrec.get_config()
  c.calrec.finetune = "full"
  with pytest.raises(ConfigError, match="set model.quantize='' and model.dtype='float32'"):
    calrec.train(c, tmp_path / "run")
  c = tiny_calrec.get_config()
  c.calrec.user_pooling = "max"
  with pytest.raises(ConfigError, match=r"config.calrec.user_pooling='max': use one of \('mean', 'cue'\)"):
    calrec.train(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "train.py", "--config=configs/tiny_calrec.py",
                         "--config.data.mixture=('ml100k', 'nope')", f"--workdir={tmp_path / 'cli'}"],
                        capture_output=True, text=True, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      "error: config.data.mixture[1]='nope' is not a dataset with item text: use one of ['beauty', 'ml100k']")


def toy_datasets(toy):
  """The toy catalogue as the target (ml100k's place) and a second toy domain as the mixture's other dataset."""
  other = nextitem.from_histories("toy2", "movie", [(3, 1, 2, 4, 5), (6, 5, 4, 3, 2), (2, 4, 6, 1, 7, 3)],
                                  TITLES[:8])  # every user leaves items out: BPR's negatives
  return {"ml100k": toy[0], "beauty": other}


def aux_config(**ratios):
  from configs import tiny_calrec  # pylint: disable=g-import-not-at-top
  c = tiny_calrec.get_config("aux")
  with c.unlocked():  # lets a test name an unknown task
    c.tasks.ratios.update(ratios)
  return c


QUESTIONS = {"mim": auxtasks.MIM_QUESTION, "bpr": auxtasks.bpr_question("product")[:25],
             "mlm": auxtasks.MLM_QUESTION}  # bpr: the verb differs per domain, the start does not


@pytest.fixture(scope="module")
def aux_run(toy):
  """A tiny_calrec:aux run on the toy datasets, rows drawn rec 1 : mim 1 : bpr 0.5 : mlm 0.5."""
  return calrec.build(aux_config(rec=1.0, mim=1.0, bpr=0.5, mlm=0.5), toy_datasets(toy))


def test_aux_tasks_fill_calrec_batches_at_their_ratios_from_training_data_only(aux_run, tmp_path):
  r = aux_run
  c, tok = r.config, r.tokenizer
  counts = collections.Counter()
  for st, names, block in zip(calrec.stages(r, tmp_path), (c.data.mixture, [c.data.dataset]),
                              (c.calrec.mixture, c.calrec.target), strict=True):
    examples = [calrec.train_examples(r, n, block.max_prefixes) for n in names]
    source = st.batches()
    for _ in range(40):
      batch = next(source)
      src, rows = source.batches.plan[source.index - 1]  # the training examples of the batch just read
      data = r.datasets[names[src]]
      held_out = {ex.user: {ex.target, *(x.target for x in nextitem.examples(data, "test") if x.user == ex.user)}
                  - set(ex.history) for ex in nextitem.examples(data, "valid")}  # valid history: the train part
      for row, e in enumerate(rows):
        ex = examples[src][e]
        text = tok.decode(batch["tokens"][row][batch["attention_mask"][row] > 0])
        tasks = [t for t, q in QUESTIONS.items() if q in text]
        if batch["history_mask"][row].any():  # CALRec's own row
          assert not tasks and batch["target_ids"][row] == ex.target
          counts["rec"] += 1
          continue
        assert len(tasks) == 1 and batch["contrastive_valid"][row] == 0, text
        counts[tasks[0]] += 1
        assert not [t for t in held_out[ex.user] if data.titles[t - 1] in text], (ex, text)
        assert batch["loss_mask"][row].sum() > 0  # its answer trains next-item generation's LM loss
    state = source.get_state()
    rest = [next(source) for _ in range(3)]
    again = st.batches()
    again.set_state(json.loads(json.dumps(state)))  # resumes the same batches
    for a, b in zip(rest, [next(again) for _ in range(3)], strict=True):
      assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  n = sum(counts.values())
  assert n == 2 * 40 * c.train.batch_size
  for task, share in {"rec": 1 / 3, "mim": 1 / 3, "bpr": 1 / 6, "mlm": 1 / 6}.items():
    assert abs(counts[task] / n - share) < 0.08, (task, counts)


def test_without_aux_tasks_the_batches_are_calrecs_own(aux_run, tmp_path):
  c = aux_config(rec=1.0, mim=0.0, bpr=0.0, mlm=0.0)  # a tasks block with rec alone: the recipe unchanged
  prompts, layout = calrec.aux_prompts(c, aux_run.datasets, aux_run.tokenizer)
  assert prompts == {} and layout is None and calrec.aux_tasks(c) == ()
  r = dataclasses.replace(aux_run, config=c, prompts=prompts, aux_layout=layout)  # as calrec.build makes it
  target = calrec.stages(r, tmp_path)[-1]
  examples = calrec.train_examples(r, "ml100k", c.calrec.target.max_prefixes)
  sources = [(r.tokens["ml100k"], examples)]
  plain = nextitem_tokens.train_batches(sources, c.train.batch_size, r.layout, c.seed)
  pt = cd.PromptTokens(r.datasets["ml100k"], r.tokenizer, c.data.max_item_tokens)
  mixed = auxtasks.calrec_train_batches([(*sources[0], r.datasets["ml100k"], pt)], c.train.batch_size, r.layout,
                                        cd.Layout(), {"rec": 1.0}, auxtasks.settings(c),
                                        c.seed)
  for a, b, m in zip(*[[next(x) for _ in range(5)] for x in (target.batches(), plain, mixed)], strict=True):
    assert a.keys() == b.keys() == m.keys() and all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], m[k])
                                                    for k in a)


def test_bad_tasks_block_gets_one_line_errors(toy, tmp_path):
  for change, message in [(dict(mim=-1.0), r"config.tasks.ratios=.*ratios must be finite and 0 or more"),
                          (dict(ctr=1.0), r"config.tasks.ratios names unknown task\(s\) \['ctr'\]"),
                          (dict(rec=0.0, mim=0.0, bpr=0.0, mlm=0.0), r"config.tasks.ratios=.* sums to zero")]:
    c = aux_config(**change)
    with pytest.raises(ConfigError, match=message) as e:
      calrec.train(c, tmp_path / "run")
    assert "\n" not in str(e.value)
  c = aux_config()
  c.tasks.mlm_mask_rate = 0.0
  with pytest.raises(ConfigError, match=r"config.tasks.mlm_mask_rate=0.0: use a share in \(0, 1\]"):
    calrec.train(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  c = aux_config()
  c.data.max_prompt_tokens = 200  # CALRec's prompts are cut to fit; an auxiliary prompt would not be
  with pytest.raises(ConfigError, match=r"config.data.max_prompt_tokens=200: ml100k's (mim|bpr) prompts "
                                        r"\(config.tasks.ratios\) may take \d+ tokens"):
    calrec.aux_prompts(c, toy_datasets(toy), toy[1])  # what calrec.build runs before the stages


def test_tiny_calrec_two_stages_killed_and_resumed_match(tmp_path, data_root, monkeypatch):
  from configs import tiny_calrec  # pylint: disable=g-import-not-at-top
  c = tiny_calrec.get_config()
  c.train.checkpoint_every = 1
  c.data.test_size = 8
  whole = calrec.train(c, tmp_path / "whole", log=lambda _: None)
  assert [s["stage"] for s in whole["stages"]] == ["mixture", "target"]
  assert whole["stages"][1]["steps"] == 3 and set(whole["test"]) == {"count", "dense", "generation"}
  assert "test, generation+BM25" in calrec.format_summary(whole)
  c.eval.generation = False  # the killed and resumed runs: training and dense scores only (faster)
  run_stage = trainer.run_stage

  def dying(stage, model, mesh):
    if stage.name == "target":
      stage = dataclasses.replace(stage, batches=lambda b=stage.batches: train_helpers.DiesAt(b(), 2, functools.partial(_raise, KeyboardInterrupt("killed"))))
    return run_stage(stage, model, mesh)
  monkeypatch.setattr(trainer, "run_stage", dying)
  with pytest.raises(KeyboardInterrupt):
    calrec.train(c, tmp_path / "run", log=lambda _: None)
  assert (tmp_path / "run" / "checkpoints" / "latest" / "1").is_dir() and not (tmp_path / "run" / "summary.json").exists()
  monkeypatch.setattr(trainer, "run_stage", run_stage)
  said = []
  resumed = calrec.train(c, tmp_path / "run", log=said.append)
  assert said == ["mixture: finished before (step 3), its parameters restored"]
  same = lambda name: (tmp_path / "whole" / name).read_text() == (tmp_path / "run" / name).read_text()  # noqa: E731
  assert same("metrics.jsonl") and same("mixture/metrics.jsonl")
  (a, step_a), (b, step_b) = train_helpers.best_params(tmp_path / "whole"), train_helpers.best_params(tmp_path / "run")
  assert step_a == step_b == 3
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert resumed["valid"] == whole["valid"] and resumed["test"]["dense"] == whole["test"]["dense"]
  again = calrec.evaluate(c, tmp_path / "run", "valid", n=c.data.valid_size)  # the entry point for a finished run
  assert again["dense"] == resumed["valid"]["dense"] and "generation" not in again


def _raise(error):
  raise error
