"""Batched generation: SmolLM2 greedy against transformers, the cache against full forwards, beam search
against brute force, sampling, stop tokens and argument errors."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import clclm_jax
from clclm_jax.model import generate as gen
from clclm_jax.model import loading
from clclm_jax.model.config import LoraConfig, presets
from clclm_jax.model.llama import Llama
from clclm_jax.model.lora import add_lora

SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n",
                "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n"]
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [100], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def smollm2():
  return loading.load_model("smollm2-135m-instruct")  # float32, not quantised


def tiny_model(vocab: int = 256, *, sharp: float = 30.0, quantize=None, lora=False, scan_layers=True, seed=0):
  """A random tiny LLaMA; the LM head scaled by `sharp` so next-token distributions have clear winners."""
  cfg = dataclasses.replace(presets["tiny"], vocab_size=vocab)
  model = Llama(cfg, quantize=quantize, scan_layers=scan_layers, rngs=nnx.Rngs(seed))
  model.lm_head.set_kernel(model.lm_head.weight() * sharp)
  if lora:  # B != 0, so the adapters change the outputs
    add_lora(model, LoraConfig(r=4, targets=("q_proj", "v_proj", "down_proj")), jax.random.key(1))
    for _, lin in model.projections(("q_proj", "v_proj", "down_proj")):
      lin.lora_b.set_value(jax.random.normal(jax.random.key(2), lin.lora_b.shape) * 0.5)
  return model


def left_pad(rows, pad=0):
  t = max(map(len, rows))
  tokens = np.full((len(rows), t), pad, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    tokens[i, t - len(r):], mask[i, t - len(r):] = r, 1
  return tokens, mask


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2):
  model, tokenizer = smollm2
  path = loading.smollm2_gguf()
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32).eval()
  n = 20
  ids = [tokenizer(p)["input_ids"] for p in SMOL_PROMPTS]
  theirs = []
  for p in ids:  # one prompt at a time: no padding on their side
    with torch.no_grad():
      out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=2)
    theirs.append(out[0, len(p):].tolist())
  g = clclm_jax.generate(model, tokenizer, SMOL_PROMPTS, max_new_tokens=n, stop_token_ids=[2])  # left-padded
  ours = [row[0, :length[0]].tolist() for row, length in zip(g.tokens_brn, g.lengths_br)]
  assert ours == theirs
  assert g.texts == [tokenizer.decode(t, skip_special_tokens=True) for t in theirs]
  assert g.texts[0].startswith(" Paris")
  # Stopping at a newline: the same tokens, up to and including the first one holding a newline.
  newline = set(gen.newline_token_ids(tokenizer))
  assert tokenizer("\n")["input_ids"][0] in newline and tokenizer("a")["input_ids"][0] not in newline
  g_nl = clclm_jax.generate(model, tokenizer, SMOL_PROMPTS, max_new_tokens=n, stop_at_newline=True)
  for t, row, length, text in zip(theirs, g_nl.tokens_brn[:, 0], g_nl.lengths_br[:, 0], g_nl.texts):
    cut = next((i + 1 for i, x in enumerate(t) if x in newline or x == 2), len(t))
    assert row[:length].tolist() == t[:cut] and "\n" not in text
    assert (row[length:] == tokenizer.pad_token_id).all()


def no_cache_greedy(model, rows, n):
  """Greedy decoding that reruns the full forward over the whole left-padded batch for every token (the
  buffer has its final width, the slots not generated yet masked out, so one program is compiled)."""
  forward = nnx.jit(lambda m, t, mask: m(t, attention_mask_bt=mask))
  tokens, mask = left_pad(rows)
  t = tokens.shape[1]
  tokens, mask = np.pad(tokens, ((0, 0), (0, n))), np.pad(mask, ((0, 0), (0, n)))
  for s in range(n):
    logits = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
    tokens[:, t + s], mask[:, t + s] = logits[:, t + s - 1].argmax(-1), 1
  return tokens[:, t:]


@pytest.mark.parametrize("variant", ["float", "int8_lora", "unrolled"])
def test_cached_decoding_equals_full_forward_with_left_padding(variant):
  model = tiny_model(sharp=1.0, quantize="int8" if variant == "int8_lora" else None,
                     lora=variant == "int8_lora", scan_layers=variant != "unrolled")
  n = 7
  # Logits of a prefill plus single-token steps equal the full forward's at every position.
  tokens, mask = left_pad(PROMPTS)
  full = np.asarray(model(jnp.asarray(tokens), attention_mask_bt=jnp.asarray(mask)))
  p = 6
  decode = nnx.jit(lambda m, x, cache, i, mask: m.decode(x, cache, i, mask))
  h, cache = decode(model, jnp.asarray(tokens[:, :p]), model.init_cache(len(PROMPTS), tokens.shape[1] + 2), 0,
                    jnp.asarray(mask[:, :p]))
  for i in range(p, tokens.shape[1] + 1):
    real = mask[:, i - 1] == 1  # a padding position's output is not defined
    np.testing.assert_allclose(np.asarray(model.lm_logits(h[:, -1]))[real], full[real, i - 1], atol=2e-5, rtol=0)
    if i < tokens.shape[1]:
      h, cache = decode(model, jnp.asarray(tokens[:, i:i + 1]), cache, jnp.int32(i), jnp.asarray(mask[:, i:i + 1]))
  # Greedy generation (cache, while loop) equals greedy by full forwards.
  g = clclm_jax.generate(model, None, PROMPTS, max_new_tokens=n, stop_token_ids=[], pad_to_multiple_of=16)
  np.testing.assert_array_equal(g.tokens_brn[:, 0], no_cache_greedy(model, PROMPTS, n))
  assert (g.lengths_br == n).all()


def test_stop_token_ends_only_its_row_and_pads_after_it():
  model = tiny_model()
  n = 6
  free = clclm_jax.generate(model, None, PROMPTS, max_new_tokens=n, stop_token_ids=[])
  stop = int(free.tokens_brn[0, 0, 2])
  g = clclm_jax.generate(model, None, PROMPTS, max_new_tokens=n, stop_token_ids=[stop], pad_token_id=0)
  for row, length, ref in zip(g.tokens_brn[:, 0], g.lengths_br[:, 0], free.tokens_brn[:, 0]):
    hits = [i for i, x in enumerate(ref) if x == stop]
    expected = hits[0] + 1 if hits else n
    assert length == expected
    np.testing.assert_array_equal(row[:length], ref[:length])
    assert (row[length:] == 0).all()
  assert g.lengths_br[0, 0] == 3
  # Greedy scores are the sum of the chosen tokens' log-probabilities.
  tokens, mask = left_pad([PROMPTS[1] + g.tokens_brn[1, 0].tolist()])
  logp = jax.nn.log_softmax(model(jnp.asarray(tokens), attention_mask_bt=jnp.asarray(mask)), -1)[0]
  t = len(PROMPTS[1])
  want = sum(float(logp[t - 1 + i, tok]) for i, tok in enumerate(g.tokens_brn[1, 0, :g.lengths_br[1, 0]]))
  np.testing.assert_allclose(g.scores_br[1, 0], want, rtol=1e-4)


def brute_force(model, prompt, n, stop, length_penalty):
  """Every continuation of up to n tokens ending at the stop token or at n, scored like beam search."""
  v = model.config.vocab_size
  others = [x for x in range(v) if x != stop]
  seqs = [tuple(p) + (stop,) for m in range(n) for p in itertools.product(others, repeat=m)]
  seqs += [tuple(p) + (x,) for p in itertools.product(others, repeat=n - 1) for x in others]
  tokens, mask = left_pad([list(prompt) + list(s) for s in seqs])
  logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens), attention_mask_bt=jnp.asarray(mask)), -1))
  t = tokens.shape[1]
  scores = {}
  for row, s in zip(logp, seqs):
    first = t - len(s)  # continuation token i sits at column first + i, predicted at column first + i - 1
    total = sum(row[first + i - 1, tok] for i, tok in enumerate(s))
    scores[s] = total / len(s) ** length_penalty
  return scores


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_equals_brute_force(length_penalty):
  v, n, stop, r = 5, 3, 2, 5
  model = tiny_model(vocab=v, sharp=8.0)
  prompts = [[1, 3, 4, 0, 3], [4, 1]]
  k = (v - 1) ** (n - 1)  # wide enough to be exhaustive
  g = clclm_jax.generate(model, None, prompts, max_new_tokens=n, num_beams=k, num_return_sequences=r,
                         stop_token_ids=[stop], length_penalty=length_penalty)
  narrow = clclm_jax.generate(model, None, prompts, max_new_tokens=n, num_beams=2, num_return_sequences=2,
                              stop_token_ids=[stop], length_penalty=length_penalty)
  for i, prompt in enumerate(prompts):
    scores = brute_force(model, prompt, n, stop, length_penalty)
    best = sorted(scores, key=scores.get, reverse=True)[:r]
    got = [tuple(row[:length].tolist()) for row, length in zip(g.tokens_brn[i], g.lengths_br[i])]
    assert got == best
    np.testing.assert_allclose(g.scores_br[i], [scores[s] for s in best], rtol=1e-4)
    # A narrow beam finds fewer, but reports each hypothesis's true score, best first.
    for row, length, score in zip(narrow.tokens_brn[i], narrow.lengths_br[i], narrow.scores_br[i]):
      np.testing.assert_allclose(score, scores[tuple(row[:length].tolist())], rtol=1e-4)
    assert narrow.scores_br[i, 0] >= narrow.scores_br[i, 1]


def test_sampling_near_zero_temperature_is_greedy_and_the_key_decides():
  model = tiny_model()
  kw = dict(max_new_tokens=6, stop_token_ids=[])
  greedy = clclm_jax.generate(model, None, PROMPTS, **kw)
  cold = clclm_jax.generate(model, None, PROMPTS, temperature=1e-6, key=jax.random.key(3),
                            num_return_sequences=2, **kw)
  np.testing.assert_array_equal(cold.tokens_brn, np.repeat(greedy.tokens_brn, 2, axis=1))
  np.testing.assert_allclose(cold.scores_br, np.repeat(greedy.scores_br, 2, axis=1), rtol=1e-5)
  hot = dict(temperature=3.0, top_p=0.95, num_return_sequences=2, **kw)
  a = clclm_jax.generate(model, None, PROMPTS, key=jax.random.key(0), **hot)
  b = clclm_jax.generate(model, None, PROMPTS, key=jax.random.key(0), **hot)
  compiled = gen._sample_loop._cache_size()
  c = clclm_jax.generate(model, None, PROMPTS, key=jax.random.key(1), **hot)
  clclm_jax.generate(model, None, PROMPTS, key=jax.random.key(1), **{**hot, "temperature": 0.5, "top_p": 0.5})
  assert gen._sample_loop._cache_size() == compiled  # another key, temperature or top-p: no recompilation
  np.testing.assert_array_equal(a.tokens_brn, b.tokens_brn)
  assert (a.tokens_brn != c.tokens_brn).any() and (a.tokens_brn[:, 0] != a.tokens_brn[:, 1]).any()


def test_top_p_keeps_only_the_nucleus():
  probs = np.array([0.05, 0.3, 0.15, 0.5])  # in decreasing order: 3, 1, 2, 0
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  for top_p, nucleus in [(0.1, {3}), (0.5, {3}), (0.7, {3, 1}), (0.85, {3, 1, 2}), (0.99, {0, 1, 2, 3}),
                         (1.0, {0, 1, 2, 3})]:
    assert set(np.flatnonzero(np.asarray(gen.top_p_mask(logits, top_p))[0])) == nucleus, top_p
  draws = np.asarray(gen.sample_tokens(jax.random.key(0), jnp.repeat(logits, 4000, 0), 1.0, 0.7))
  counts = np.bincount(draws, minlength=4) / len(draws)
  assert counts[0] == counts[2] == 0
  np.testing.assert_allclose(counts[[3, 1]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


@pytest.mark.parametrize("prompts,kw,name", [
    ([], {}, "prompts"),
    ([[1, 2], []], {}, "prompts[1]"),
    ([[1, 300]], {}, "prompts"),
    (["text"], {}, "tokenizer"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens"),
    ([[1, 2]], dict(max_new_tokens=-3), "max_new_tokens"),
    ([[1, 2]], dict(num_beams=0), "num_beams"),
    ([[1, 2]], dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    ([[1, 2]], dict(num_return_sequences=2), "num_return_sequences"),
    ([[1, 2]], dict(temperature=-1.0, key=jax.random.key(0)), "temperature"),
    ([[1, 2]], dict(temperature=1.0), "key"),
    ([[1, 2]], dict(temperature=1.0, key=jax.random.key(0), top_p=0.0), "top_p"),
    ([[1, 2]], dict(stop_token_ids=[999]), "stop_token_ids"),
])
def test_bad_arguments_raise_one_line_naming_the_argument(prompts, kw, name):
  model = tiny_model()
  with pytest.raises(ValueError) as e:
    clclm_jax.generate(model, None, prompts, **kw)
  message = str(e.value)
  assert message.startswith(name) and "\n" not in message
