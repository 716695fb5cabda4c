"""grain input pipelines: records -> encoded examples -> padded (or packed) numpy batches.

Chain: `MapDataset` source -> map(encode, lazy) -> per-process shard -> shuffle(seed) -> repeat -> batch.
Batches are dicts of numpy arrays: `tokens`, `positions`, `attention_mask`, `loss_mask` [b, t]
(right padding, t a multiple of `pad_multiple`), `answer_index`, `label`, `user_ids`, `index` [b]
and `history_ids` [b, L] (left-padded with 0, most recent item last). Iterators are grain
`DatasetIterator`s: `get_state()` / `set_state()` resume exactly at the next batch.
"""

import functools
import math
from collections.abc import Sequence

import grain
import jax
import numpy as np

from clclm_jax.data import prompts, tokenize
from clclm_jax.data.records import Catalogue, Interaction

Example = dict[str, np.ndarray]
# Encoding is Python (GIL-bound): a small prefetch hides latency without taking cores from XLA, and
# keeps `set_state` cheap (grain's default of 16 threads x 500 elements re-encodes thousands on restore).
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


def _example(enc: tokenize.Encoded, *, label: int, user: int, index: int, history: np.ndarray) -> Example:
  return {"tokens": enc.tokens, "loss_mask": enc.loss_mask, "answer_index": np.int32(enc.answer_index),
          "label": np.int32(label), "user_ids": np.int32(user), "index": np.int32(index), "history_ids": history}


def _history(ids: Sequence[int], length: int) -> np.ndarray:
  ids = list(ids)[-length:]
  return np.asarray([0] * (length - len(ids)) + ids, np.int32)


def tallrec_examples(interactions: Sequence[Interaction], catalogue: Catalogue, domain: str,
                     tokenizer: tokenize.Tokenizer, *, cutoff_len: int = 512, train_on_inputs: bool = True,
                     template: str = "alpaca", history_len: int = 10, path=None,
                     context: int | None = None) -> grain.MapDataset:
  """A lazily encoded `MapDataset` of TALLRec examples; errors name each record's file and index in it
  (`Interaction.source`, else `path` and the position in `interactions`); prompts beyond the model's `context`
  are refused."""

  def encode(indexed: tuple[int, Interaction]) -> Example:
    index, x = indexed
    enc = tokenize.encode_interaction(tokenizer, x, catalogue, domain, cutoff_len=cutoff_len,
                                      train_on_inputs=train_on_inputs, template=template, path=path, index=index,
                                      context=context)
    return _example(enc, label=x.label, user=x.user, index=index, history=_history(x.history_ids, history_len))

  return grain.MapDataset.source(list(enumerate(interactions))).map(encode)


def alpaca_examples(records: Sequence[dict[str, str]], tokenizer: tokenize.Tokenizer, *, cutoff_len: int = 512,
                    train_on_inputs: bool = True, template: str = "alpaca",
                    history_len: int = 10) -> grain.MapDataset:
  """Alpaca instruction records as examples (label -1); records longer than `cutoff_len` are left out."""
  tmpl, kept = prompts.template(template), []
  for i, r in enumerate(records):
    try:
      enc = tokenize.encode_example(tokenizer, tmpl.prompt(r["instruction"], r["input"]), r["output"],
                                    cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
    except tokenize.TooLong:
      continue
    kept.append(_example(enc, label=-1, user=0, index=i, history=np.zeros(history_len, np.int32)))
  return grain.MapDataset.source(kept)


def collate(examples: Sequence[Example], *, pad_multiple: int = 64, batch_size: int | None = None,
            width: int | None = None) -> Example:
  """Stacks examples into a batch right-padded to `width` tokens (default: a multiple of `pad_multiple`);
  fill rows up to `batch_size`."""
  examples = list(examples) + [_blank(examples[0])] * ((batch_size or len(examples)) - len(examples))
  longest = max(len(e["tokens"]) for e in examples)
  t = pad_multiple * max(1, math.ceil(longest / pad_multiple)) if width is None else width
  if t < longest:
    raise ValueError(f"width {t} is shorter than the batch's longest example ({longest} tokens)")
  tokens, mask, loss = (np.zeros((len(examples), t), np.int32) for _ in range(3))
  for r, e in enumerate(examples):
    n = len(e["tokens"])
    tokens[r, :n], mask[r, :n], loss[r, :n] = e["tokens"], 1, e["loss_mask"]
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  batch = {"tokens": tokens, "positions": positions, "attention_mask": mask, "loss_mask": loss}
  for key in ("answer_index", "label", "user_ids", "index", "history_ids"):
    batch[key] = np.stack([e[key] for e in examples])
  return batch


PER_TOKEN_KEYS = ("tokens", "loss_mask", "history_mask")  # arrays as long as the example's tokens


def _blank(like: Example) -> Example:
  """A fill row shaped like `like`: no tokens, index and label -1, every other array zero."""
  blank = {k: np.zeros(0, np.int32) if k in PER_TOKEN_KEYS else np.zeros_like(v) for k, v in like.items()}
  blank["label"], blank["index"] = np.int32(-1), np.int32(-1)
  return blank


def _shard(ds: grain.MapDataset, shard_index: int | None, shard_count: int | None) -> grain.MapDataset:
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
  return ds[shard_index::shard_count]


def train_dataset(examples: grain.MapDataset, *, batch_size: int, seed: int, num_epochs: int | None = None,
                  pad_multiple: int = 64, pack_len: int | None = None, shard_index: int | None = None,
                  shard_count: int | None = None, read_options: grain.ReadOptions = READ_OPTIONS) -> grain.IterDataset:
  """Shuffled, repeated training batches of this process's shard; `iter()` it for a checkpointable iterator.

  With `pack_len`, examples are first-fit packed into rows of `pack_len` tokens: batches then hold
  `tokens`, `loss_mask`, `segment_ids` (0 = padding) and `positions` only (for LM-loss training).
  """
  ds = _shard(examples, shard_index, shard_count)
  if len(ds) < batch_size and pack_len is None:
    raise ValueError(f"shard has {len(ds)} examples, fewer than batch_size {batch_size}")
  ds = ds.shuffle(seed).repeat(num_epochs)
  if pack_len is None:
    return ds.batch(batch_size, drop_remainder=True,
                    batch_fn=functools.partial(collate, pad_multiple=pad_multiple)).to_iter_dataset(read_options)
  ds = ds.map(lambda e: {"tokens": e["tokens"], "loss_mask": e["loss_mask"]}).to_iter_dataset(read_options)
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"tokens": pack_len, "loss_mask": pack_len}, num_packing_bins=batch_size, seed=seed)
  return ds.batch(batch_size, drop_remainder=True).map(_packed_batch)


def _packed_batch(b: Example) -> Example:
  return {"tokens": b["tokens"].astype(np.int32), "loss_mask": b["loss_mask"].astype(np.int32),
          "segment_ids": b["tokens_segment_ids"].astype(np.int32),
          "positions": b["tokens_positions"].astype(np.int32)}


def batch_widths(longest: Sequence[int], max_widths: int, multiple: int = 8) -> list[int]:
  """A padded width per batch, given each batch's longest example (batches in length order): at most
  `max_widths` distinct widths, each a multiple of `multiple`, with the fewest padded tokens in all.

  Each distinct width compiles the scoring program once, so a few widths chosen from the data pad far less
  than rounding every batch up to one coarse multiple (TALLRec movie test: 20% of the tokens after the
  shared prefix were padding at multiples of 64, 5% with 6 widths chosen here).
  """
  m = [multiple * max(1, math.ceil(n / multiple)) for n in longest]
  n, k_max = len(m), max(1, min(max_widths, len(m)))
  # cost[k][j]: fewest padded tokens of batches [0, j) in k contiguous groups; a group's width is its maximum.
  inf = float("inf")
  cost = [[inf] * (n + 1) for _ in range(k_max + 1)]
  start = [[0] * (n + 1) for _ in range(k_max + 1)]
  cost[0][0] = 0
  for k in range(1, k_max + 1):
    for j in range(1, n + 1):
      top = 0
      for i in range(j - 1, -1, -1):  # the last group is batches [i, j)
        top = max(top, m[i])
        c = cost[k - 1][i] + (j - i) * top
        if c < cost[k][j]:
          cost[k][j], start[k][j] = c, i
  k = min(range(1, k_max + 1), key=lambda kk: cost[kk][n])
  widths, j = [0] * n, n
  while j > 0:
    i = start[k][j]
    widths[i:j] = [max(m[i:j])] * (j - i)
    j, k = i, k - 1
  return widths


def group_widths(groups: Sequence[Sequence[Example]], max_widths: int) -> list[int | None]:
  """`batch_widths` of length-sorted groups of examples; None for every group (pad to multiples of
  `pad_multiple`) when `max_widths` is 0."""
  if max_widths <= 0:
    return [None] * len(groups)
  return batch_widths([max(len(e["tokens"]) for e in g) for g in groups], max_widths)


def eval_dataset(examples: grain.MapDataset, *, batch_size: int, pad_multiple: int = 64, max_widths: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None, collate_fn=collate
                 ) -> grain.MapDataset:
  """Every example of this shard exactly once, sorted by length, in full batches (fill rows have index -1),
  padded to at most `max_widths` widths chosen by `batch_widths` (0: to multiples of `pad_multiple`);
  `collate_fn` is `collate` or one with its arguments that adds arrays (e.g. fused prompts').

  Every shard yields the same number of batches, so processes step through evaluation together.
  """
  shard_count = jax.process_count() if shard_count is None else shard_count
  shard = sorted(_shard(examples, shard_index, shard_count), key=lambda e: (len(e["tokens"]), int(e["index"])))
  num_batches = math.ceil(math.ceil(len(examples) / shard_count) / batch_size)
  blank = _blank(examples[0])
  batches = [shard[i * batch_size:(i + 1) * batch_size] or [blank] for i in range(num_batches)]
  return grain.MapDataset.source(list(zip(batches, group_widths(batches, max_widths)))).map(
      lambda bw: collate_fn(bw[0], pad_multiple=pad_multiple, batch_size=batch_size, width=bw[1]))
