"""CALRec (Li et al. 2024, arXiv 2405.02429) through the one trainer: a generative LLM fine-tuned in two-tower
fashion on next-item text, first on a mixture of domains, then on the target domain.

Two towers, one LLM (`CALRec.llm`), both pooling final-normed last-layer states:
  item tower   the LLM over an item's line alone -> v_T, their mean;
  joint pass   the LLM over `[history prompt ; target line]` (`data/nextitem_tokens.py`) -> v_U, the mean over
               the prompt (with `calrec.user_pooling="cue"`: the one state after it and the `Title:` that opens
               every item line), and v_T|U, the mean over the target's line (causal attention: the prompt's
               states are those of the prompt alone, so v_U needs no target at inference).
Losses, registered for `train.step` (a weight of 0 switches one off and skips its work: no item-tower pass when
both InfoNCE weights are 0):
  `calrec_nig`  next-item generation: CE on the target line's tokens and its closing newline only, per token
                (accumulated micro-batches weigh by their target tokens);
  `calrec_tt`   InfoNCE between v_T|U and v_T;  `calrec_ut`  InfoNCE between v_U and v_T.
InfoNCE is `contrastive.losses.info_nce` with cosine similarity and `calrec.temperature`: NT-Xent over the 2B
vectors of a (micro-)batch, each pair's positive its partner and every other vector of either tower a negative, or
with `calrec.same_tower_negatives=False` only the other tower's (CLIP's symmetric loss). The paper's exact form
(one direction or both, same-tower negatives) is not in the sources we have. Rows whose
target repeats an earlier row's in the batch are left out of both InfoNCE terms (they would be false negatives).

Stages (`stages`): "mixture" (every `data.mixture` dataset, single-domain batches interleaved, seeded) in
WORKDIR/mixture, then "target" (`data.dataset` only) in WORKDIR; both validated by dense Recall@10 / NDCG@10
(cosine(v_U, v_T) over the whole target catalogue) on a seeded validation subset, NDCG@10 picking the best
checkpoint. With a `tasks` block (configs/calrec_ml100k.py:aux, the schema of the candidate configs) each stage's
batches also carry Cao et al.'s auxiliary-task prompts (`data/auxtasks.calrec_train_batches`: rows drawn by
`tasks.ratios`, "rec" being CALRec's own row; made from training examples only) that train next-item generation's
LM loss and neither InfoNCE term; without one, or with "rec" alone, the batches are CALRec's own. LoRA
(`nnx.LoRAParam`) by default; `calrec.finetune="full"` trains every float weight of an unquantised float32 model
(embedding, norms, projections; the LoRA factors too).

Evaluation: `dense_rankings` (cosine over the catalogue, item vectors cached per parameters) and
`generation_rankings` (`model.generate` continuations, BM25 per continuation, round-robin merge), both full
catalogue rankings for `seqrec.metrics`.
"""

import dataclasses
import functools
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.contrastive import losses
from clclm_jax.data import auxtasks, nextitem, nextitem_tokens
from clclm_jax.data import candidates as cand_data
from clclm_jax.data.nextitem_tokens import ItemTokens, Layout
from clclm_jax.model import build as model_build
from clclm_jax.model import generate as generate_lib
from clclm_jax.model.llama import Frozen, Llama
from clclm_jax.seqrec import baselines, metrics, retrieval
from clclm_jax.train import checkpoint, runconfig, sharding, trainer
from clclm_jax.train.evaluate import progress
from clclm_jax.train.errors import ConfigError
from clclm_jax.train.step import register_loss

NIG, TT, UT = "calrec_nig", "calrec_tt", "calrec_ut"
# What a stage trains: LoRA factors, or every float weight (`Frozen` base weights are plain variables).
TRAINS = {"lora": nnx.LoRAParam, "full": nnx.Any(nnx.Param, Frozen)}
SUMMARY = "summary.json"
METRIC = "NDCG@10"  # the validation metric that picks the best checkpoint


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """What the losses read beside the batch (static: part of the compiled step)."""

  temperature: float = 0.1
  same_tower: bool = True  # negatives from both towers (NT-Xent) or from the other tower only (CLIP)
  user_pooling: str = "mean"  # v_U: "mean" over the prompt, or "cue": one state after it (`user_pool`)


class CALRec(nnx.Module):
  """The LLM and its loss settings: one model for both towers."""

  def __init__(self, llm: Llama, settings: LossSettings):
    self.llm = llm
    self.settings = settings


USER_POOLING = ("mean", "cue")


def user_pool(h_btd: jax.Array, batch: Mapping[str, jax.Array], pooling: str = "mean") -> jax.Array:
  """v_U [b, d] float32 from the states of prompt rows: their mean over the prompt (`history_mask`), or ("cue")
  the state at `cue_mask`, after the prompt and the `Title:` every item line opens with: the state that next-item
  generation trains to predict the target's first word. (The mean is dominated by the template every prompt
  shares; the prompt's own last state predicts `Title`, the same for every user.)"""
  if pooling not in USER_POOLING:
    raise ValueError(f"user pooling {pooling!r}: use one of {USER_POOLING}")
  return losses.masked_mean(h_btd, batch["history_mask" if pooling == "mean" else "cue_mask"])


def user_vectors(llm: Llama, batch: Mapping[str, jax.Array], key: jax.Array | None = None,
                 pooling: str = "mean") -> jax.Array:
  """v_U of prompt rows (`tokens`, `attention_mask`, `history_mask`, `cue_mask`)."""
  h_btd = llm.hidden_states(batch["tokens"], None, batch["attention_mask"], dropout_key=key)
  return user_pool(h_btd, batch, pooling)


def item_vectors(llm: Llama, batch: Mapping[str, jax.Array], key: jax.Array | None = None) -> jax.Array:
  """v_T of item rows (`item_tokens`, `item_attention`, `item_mask`)."""
  h_btd = llm.hidden_states(batch["item_tokens"], None, batch["item_attention"], dropout_key=key)
  return losses.masked_mean(h_btd, batch["item_mask"])


@register_loss(NIG, TT, UT, per_token=(NIG,))
def calrec_losses(model: CALRec, batch: Mapping[str, jax.Array], key: jax.Array | None,
                  names: Sequence[str]) -> dict[str, jax.Array]:
  """The asked terms from one joint pass (and one item-tower pass when an InfoNCE term is asked)."""
  joint_key, item_key = (None, None) if key is None else jax.random.split(key)
  llm, tau = model.llm, model.settings.temperature
  h_btd = llm.hidden_states(batch["tokens"], None, batch["attention_mask"], dropout_key=joint_key)
  terms = {}
  if NIG in names:  # the LM head on the target positions only (`target_index`), so it can train in "full" mode
    terms[NIG] = losses.target_ce(llm, h_btd, batch)
  if TT in names or UT in names:
    v_t = item_vectors(llm, batch, item_key)
    valid_b = batch["contrastive_valid"] > 0
    nce = functools.partial(losses.info_nce, temperature=tau, similarity="cosine", valid_n=valid_b,
                            same_side=model.settings.same_tower)
    if TT in names:
      terms[TT] = nce(losses.masked_mean(h_btd, batch["target_mask"]), v_t)
    if UT in names:
      terms[UT] = nce(user_pool(h_btd, batch, model.settings.user_pooling), v_t)
  return terms


# --- Encoding and ranking --------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "tower", "pooling"))
def _tower(graphdef, state, batch, *, tower: str, pooling: str) -> jax.Array:
  llm = nnx.merge(graphdef, state)
  return user_vectors(llm, batch, pooling=pooling) if tower == "user" else item_vectors(llm, batch)


def _encode(llm: Llama, tower: str, rows: Sequence[Any], make_batch: Callable[[list], dict],
            batch_size: int, pooling: str = "mean") -> np.ndarray:
  """Vectors [len(rows), d], `batch_size` rows a call (the last call filled with its last row: one shape)."""
  graphdef, state = nnx.split(llm)
  out = []
  for start in progress(range(0, len(rows), batch_size), f"{tower} vectors"):  # minutes for a catalogue on CPU
    part = list(rows[start:start + batch_size])
    batch = make_batch(part + [part[-1]] * (batch_size - len(part)))
    out.append(np.asarray(_tower(graphdef, state, batch, tower=tower, pooling=pooling))[:len(part)])
  return np.concatenate(out) if out else np.zeros((0, llm.config.hidden_size), np.float32)


def encode_items(llm: Llama, it: ItemTokens, item_ids: Sequence[int], *, batch_size: int = 64) -> np.ndarray:
  """v_T [n, d] of `item_ids` (their lines alone)."""
  return _encode(llm, "item", list(item_ids), functools.partial(nextitem_tokens.item_batch, it), batch_size)


def encode_users(llm: Llama, it: ItemTokens, histories: Sequence[Sequence[int]], layout: Layout, *,
                 batch_size: int = 16, pooling: str = "mean") -> np.ndarray:
  """v_U [n, d] of histories (their prompts, cut per `layout`; `user_pool`'s `pooling`)."""
  make = lambda hs: nextitem_tokens.prompt_batch(it, hs, layout)  # noqa: E731
  return _encode(llm, "user", list(histories), make, batch_size, pooling)


def params_digest(model: nnx.Module, trains=nnx.Param) -> str:
  """SHA-256 of the `trains` parameters' values (part of an item-vector cache key: vectors of other weights miss)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(nnx.state(model, trains)):
    x = np.asarray(jax.device_get(leaf))
    h.update(f"{x.dtype}{x.shape}".encode() + x.tobytes())
  return h.hexdigest()


def dense_rankings(model: Llama, tokenizer, data: nextitem.NextItemData, examples: Sequence[nextitem.Example],
                   layout: Layout = Layout(), *, k: int | None = None, exclude_history: bool = False,
                   batch_size: int = 16, cache_dir: str | pathlib.Path | None = None,
                   cache_key: Mapping | None = None, tokens: ItemTokens | None = None,
                   user_pooling: str = "mean") -> np.ndarray:
  """Catalogue ids [len(examples), k] (default: every item) ranked by cosine(v_U, v_T), best first. With
  `cache_dir`, the catalogue's v_T and the examples' v_U are `retrieval.cached_vectors` under `cache_key` (name
  the model and its weights, e.g. `params_digest`) plus the catalogue's text and `layout.max_item_tokens` (and
  for v_U the layout, pooling and histories). `model` is a Llama (a `CALRec`'s `.llm`); `tokens` the
  `ItemTokens` of `data` when already built."""
  it = tokens if tokens is not None else nextitem_tokens.item_tokens(data, tokenizer, layout.max_item_tokens)
  histories = [ex.history for ex in examples]
  compute_items = lambda: encode_items(model, it, data.item_ids, batch_size=batch_size)  # noqa: E731
  compute_users = lambda: encode_users(model, it, histories, layout, batch_size=batch_size,  # noqa: E731
                                       pooling=user_pooling)
  if cache_dir is None:
    items_nd, users_bd = compute_items(), compute_users()
  else:
    key = {**(cache_key or {}), "dataset": data.name, "max_item_tokens": layout.max_item_tokens,
           "texts": retrieval.text_fingerprint(nextitem.catalogue_texts(data)),
           "tokenizer": [type(tokenizer).__name__, len(tokenizer)]}
    items_nd = retrieval.cached_vectors(cache_dir, key, compute_items, name=f"item_vectors_{data.name}")
    # The users' too: a run's summary scores the validation users again with the weights its last check had.
    user_key = {**key, "layout": dataclasses.astuple(layout), "pooling": user_pooling,
                "histories": retrieval.text_fingerprint([",".join(map(str, h)) for h in histories])}
    users_bd = retrieval.cached_vectors(cache_dir, user_key, compute_users, name=f"user_vectors_{data.name}")
  exclude = histories if exclude_history else None
  return retrieval.dense_top_k(users_bd, items_nd, k or data.num_items, data.item_ids, exclude=exclude)


def generate_items(model: Llama, tokenizer, data: nextitem.NextItemData, examples: Sequence[nextitem.Example],
                   layout: Layout = Layout(), *, num_samples: int = 1, num_beams: int = 1, temperature: float = 0.0,
                   top_p: float = 1.0, max_new_tokens: int | None = None, key: jax.Array | None = None,
                   batch_size: int = 8, tokens: ItemTokens | None = None) -> list[list[str]]:
  """`num_samples` generated item lines per example (greedy: 1; sampling with `temperature > 0` and `key`,
  chunk c drawing with `fold_in(key, c)`; beam search with `num_beams > 1`, the best `num_samples` beams), each
  up to its newline, after the same prompt tokens as training; `batch_size` prompts a call (one shape)."""
  it = tokens if tokens is not None else nextitem_tokens.item_tokens(data, tokenizer, layout.max_item_tokens)
  prompts = [nextitem_tokens.prompt_ids(it, ex.history, layout) for ex in examples]
  eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
  stops = sorted({*generate_lib.newline_token_ids(tokenizer), *([] if eos is None else [eos])})
  stops = [i for i in stops if i < model.config.vocab_size]
  out = []
  for c, start in enumerate(progress(range(0, len(prompts), batch_size), "generating")):
    part = prompts[start:start + batch_size]
    g = generate_lib.generate(
        model, tokenizer, part + [part[-1]] * (batch_size - len(part)),
        max_new_tokens=max_new_tokens or it.target_width, temperature=temperature, top_p=top_p,
        key=None if key is None else jax.random.fold_in(key, c), num_beams=num_beams,
        num_return_sequences=num_samples, stop_token_ids=stops, pad_to_multiple_of=layout.pad_multiple)
    out += [[text.split("\n", 1)[0].strip() for text in texts] for texts in g.texts_br[:len(part)]]
  return out


def rankings_from_texts(data: nextitem.NextItemData, examples: Sequence[nextitem.Example],
                        texts: Sequence[Sequence[str]], *, k: int | None = None, exclude_history: bool = False,
                        index: retrieval.BM25Index | None = None) -> list[list[int]]:
  """Per example, BM25's ranking (`k` items, default all) for each of its texts, merged round-robin; history
  items left out when `exclude_history`."""
  index = index if index is not None else retrieval.BM25Index(nextitem.catalogue_texts(data), data.item_ids)
  exclude = [ex.history for ex in examples] if exclude_history else None
  return index.retrieve_merged(texts, k or data.num_items, exclude=exclude)


def generation_rankings(model: Llama, tokenizer, data: nextitem.NextItemData,
                        examples: Sequence[nextitem.Example], layout: Layout = Layout(), *, num_samples: int = 1,
                        num_beams: int = 1, k: int | None = None, exclude_history: bool = False,
                        index: retrieval.BM25Index | None = None, **generate_kw) -> list[list[int]]:
  """CALRec's inference: `generate_items` (keywords as there), BM25 per continuation, quasi-round-robin merge;
  a full ranking per example (`k` items, default all) for `metrics.ranks_from_lists`."""
  texts = generate_items(model, tokenizer, data, examples, layout, num_samples=num_samples, num_beams=num_beams,
                         **generate_kw)
  return rankings_from_texts(data, examples, texts, k=k, exclude_history=exclude_history, index=index)


def list_metrics(rankings: Sequence[Sequence[int]], examples: Sequence[nextitem.Example]) -> dict[str, float]:
  """Recall@1/5/10, NDCG@5/10 and `count` of ranked lists."""
  return metrics.ranking_metrics(metrics.ranks_from_lists(rankings, [ex.target for ex in examples]))


# --- A run from a config ---------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """What every stage and evaluation of a run shares."""

  config: ConfigDict
  model: CALRec
  tokenizer: Any
  layout: Layout
  datasets: dict[str, nextitem.NextItemData]
  tokens: dict[str, ItemTokens]
  mesh: Any
  # With auxiliary tasks on (`aux_tasks`): each dataset's title tokens for their prompts, and those prompts' layout.
  prompts: dict[str, cand_data.PromptTokens] = dataclasses.field(default_factory=dict)
  aux_layout: cand_data.Layout | None = None

  @property
  def target(self) -> nextitem.NextItemData:
    return self.datasets[self.config.data.dataset]

  @property
  def trains(self):
    return TRAINS[self.config.calrec.finetune]


def dataset_names(config: ConfigDict) -> list[str]:
  """The datasets a config reads: the target, and the mixture's when its stage runs."""
  d = config.data
  mixture = list(d.mixture) if config.calrec.mixture.steps > 0 else []
  return list(dict.fromkeys([d.dataset, *mixture]))


def task_ratios(config: ConfigDict) -> dict[str, float]:
  """`tasks.ratios` of a config with a `tasks` block; CALRec's own rows only without one."""
  return dict(config.tasks.ratios) if "tasks" in config else {"rec": 1.0}


def aux_tasks(config: ConfigDict) -> tuple[str, ...]:
  """The auxiliary tasks a config mixes into CALRec's batches (none: the batches are CALRec's own)."""
  return tuple(t for t in auxtasks.TASKS if t != "rec" and task_ratios(config).get(t, 0) > 0)


def check_config(config: ConfigDict) -> None:
  """Stops on a bad value with one line naming the field, before anything is built or written."""
  runconfig.validate(config)
  d, cr, e = config.data, config.calrec, config.eval
  fields = [("data.dataset", d.dataset)] + [(f"data.mixture[{i}]", n) for i, n in enumerate(d.mixture)]
  for field, name in fields:
    if name in nextitem.ID_ONLY_DATASETS:
      raise ConfigError(f"config.{field}={name!r} has no item titles (ID-only: configs/pretrain_*.py); CALRec "
                        f"reads item text: use one of {sorted(nextitem.TEXT_DATASETS)}")
    if name not in nextitem.TEXT_DATASETS:
      raise ConfigError(f"config.{field}={name!r} is not a dataset with item text: use one of "
                        f"{sorted(nextitem.TEXT_DATASETS)}")
  if cr.finetune not in TRAINS:
    raise ConfigError(f"config.calrec.finetune={cr.finetune!r}: use one of {sorted(TRAINS)}")
  if cr.finetune == "full" and (config.model.quantize or config.model.dtype != "float32"):
    raise ConfigError(f"config.calrec.finetune='full' trains the base weights: set model.quantize='' and "
                      f"model.dtype='float32' (now {config.model.quantize!r}, {config.model.dtype!r})")
  unknown = set(cr.loss_weights) - {NIG, TT, UT}
  if unknown or not any(cr.loss_weights.values()):
    raise ConfigError(f"config.calrec.loss_weights={dict(cr.loss_weights)}: name only {NIG}, {TT}, {UT}, "
                      "at least one above 0")
  if not cr.temperature > 0:
    raise ConfigError(f"config.calrec.temperature={cr.temperature}: use a positive temperature")
  if cr.get("user_pooling", "mean") not in USER_POOLING:
    raise ConfigError(f"config.calrec.user_pooling={cr.user_pooling!r}: use one of {USER_POOLING}")
  if "tasks" in config:
    try:
      auxtasks.check_tasks(config.tasks)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  for block in ("mixture", "target"):
    if cr[block].steps < 0 or cr[block].max_prefixes < 0:
      raise ConfigError(f"config.calrec.{block}: steps={cr[block].steps} and max_prefixes="
                        f"{cr[block].max_prefixes} must be 0 or more")
  for field in ("max_item_tokens", "max_prompt_tokens", "pad_multiple"):
    if d[field] < 1:
      raise ConfigError(f"config.data.{field}={d[field]}: use 1 or more")
  if e.num_samples < 1 or e.num_beams < 1 or (e.temperature == 0 and e.num_beams == 1 and e.num_samples > 1):
    raise ConfigError(f"config.eval: num_samples={e.num_samples} with temperature={e.temperature}, num_beams="
                      f"{e.num_beams}: greedy decoding gives one text; sample (temperature > 0) or use beams")
  if e.num_beams > 1 and (e.temperature > 0 or e.num_samples > e.num_beams):
    raise ConfigError(f"config.eval: beam search (num_beams={e.num_beams}) needs temperature=0 and num_samples "
                      "<= num_beams")


def loss_settings(config: ConfigDict) -> LossSettings:
  """The config's loss settings (a run saved before a field existed gets that field's earlier behaviour)."""
  cr = config.calrec
  return LossSettings(cr.temperature, cr.get("same_tower_negatives", True), cr.get("user_pooling", "mean"))


def load_datasets(config: ConfigDict) -> dict[str, nextitem.NextItemData]:
  return {name: nextitem.load(name) for name in dataset_names(config)}


def aux_prompts(config: ConfigDict, datasets: Mapping[str, nextitem.NextItemData],
                tokenizer) -> tuple[dict[str, cand_data.PromptTokens], cand_data.Layout | None]:
  """Each dataset's title tokens for the auxiliary prompts and their layout (none without auxiliary tasks). Those
  prompts are never cut: one that may not fit `data.max_prompt_tokens` whole stops the run with one line."""
  if not aux_tasks(config):
    return {}, None
  d, s = config.data, auxtasks.settings(config)
  prompts = {}
  for name, data in datasets.items():
    pt = prompts[name] = cand_data.PromptTokens(data, tokenizer, d.max_item_tokens)
    for task in aux_tasks(config):
      need = auxtasks.prompt_bound(pt, data.kind, task, s)
      if need > d.max_prompt_tokens:
        raise ConfigError(f"config.data.max_prompt_tokens={d.max_prompt_tokens}: {name}'s {task} prompts "
                          f"(config.tasks.ratios) may take {need} tokens (max_history={d.max_history}, "
                          f"max_item_tokens={d.max_item_tokens}): raise it or lower those")
  return prompts, cand_data.Layout(d.max_history, d.max_prompt_tokens, d.max_item_tokens, d.pad_multiple)


def build(config: ConfigDict, datasets: dict[str, nextitem.NextItemData] | None = None) -> Run:
  """The LLM (`model_build.build_model`), its loss settings, each dataset's `ItemTokens`, the mesh."""
  check_config(config)
  sharding.maybe_initialize_distributed(config)
  datasets = datasets if datasets is not None else load_datasets(config)
  d = config.data
  layout = Layout(d.max_history, d.max_prompt_tokens, d.max_item_tokens, d.pad_multiple)
  llm, tokenizer = model_build.build_model(config)
  tokens = {n: nextitem_tokens.item_tokens(data, tokenizer, layout.max_item_tokens) for n, data in datasets.items()}
  for name, it in tokens.items():
    if it.fixed_prompt_tokens >= layout.max_prompt_tokens:
      raise ConfigError(f"config.data.max_prompt_tokens={layout.max_prompt_tokens} leaves no room for a history "
                        f"item in {name}'s prompts ({it.fixed_prompt_tokens} tokens of fixed text)")
  prompts, aux_layout = aux_prompts(config, datasets, tokenizer)
  model = CALRec(llm, loss_settings(config))
  return Run(config, model, tokenizer, layout, datasets, tokens, sharding.make_mesh(config.mesh), prompts,
             aux_layout)


def subset(r: Run, part: str, n: int) -> list[nextitem.Example]:
  """The seeded `n`-user subset (n < 0: all) of the target's `part` examples that every method scores
  (`baselines.sample_examples` with `data.subset_seed`: baselines run with that seed score the same users)."""
  xs = nextitem.examples(r.target, part)
  return xs if n < 0 else baselines.sample_examples(xs, n, r.config.data.subset_seed)


def model_key(config: ConfigDict, llm: Llama) -> dict:
  """The item-vector cache key of `llm` as it is now: the base model it was built from and its trained weights."""
  m = config.model
  return {"model": [m.source, m.preset, m.tokenizer, m.dtype, m.quantize, config.seed],
          "weights": params_digest(llm, TRAINS[config.calrec.finetune])}


def dense_metrics(r: Run, model: CALRec, examples: Sequence[nextitem.Example], cache_dir: pathlib.Path,
                  k: int | None = None) -> dict[str, float]:
  """Recall / NDCG of `model`'s dense rankings of `examples` (item vectors cached in `cache_dir`)."""
  key = model_key(r.config, model.llm)
  lists = dense_rankings(model.llm, r.tokenizer, r.target, examples, r.layout, k=k,
                         exclude_history=r.config.eval.exclude_history, batch_size=r.config.train.eval_batch_size,
                         cache_dir=cache_dir, cache_key=key, tokens=r.tokens[r.target.name],
                         user_pooling=model.settings.user_pooling)
  return list_metrics(lists, examples)


def train_examples(r: Run, name: str, max_prefixes: int) -> list[nextitem.Example]:
  """`name`'s training prefixes (at most `max_prefixes` per user, 0: all) of `data.max_users` users (0: all)."""
  c = r.config
  xs = nextitem.examples(r.datasets[name], "train", max_prefixes=max_prefixes or None, seed=c.seed)
  return nextitem_tokens.limit_users(xs, c.data.max_users, c.seed)


def stage(r: Run, name: str, names: Sequence[str], block: ConfigDict, workdir: pathlib.Path,
          cache_dir: pathlib.Path) -> trainer.Stage:
  """`block.steps` updates on batches of `names`' training examples (with auxiliary-task rows at `tasks.ratios`
when the run has them), validated by dense NDCG@10 on the target's `data.valid_size` validation users."""
  c = r.config
  sources = [(r.tokens[n], train_examples(r, n, block.max_prefixes)) for n in names]
  if r.prompts:
    aux_sources = [(it, xs, r.datasets[n], r.prompts[n]) for n, (it, xs) in zip(names, sources)]
    batches = lambda: auxtasks.calrec_train_batches(  # noqa: E731
        aux_sources, c.train.batch_size, r.layout, r.aux_layout, task_ratios(c), auxtasks.settings(c), c.seed)
  else:
    batches = lambda: nextitem_tokens.train_batches(sources, c.train.batch_size, r.layout, c.seed)  # noqa: E731
  tasks = " + ".join(aux_tasks(c))
  valid = subset(r, "valid", c.data.valid_size)

  def check(model: CALRec) -> dict[str, float]:
    out = dense_metrics(r, model, valid, cache_dir, k=10)
    return {k: v for k, v in out.items() if k != "count"}
  return trainer.Stage(
      name, workdir, batches, dict(c.calrec.loss_weights), block.steps, c.optim, c.train.batch_size,
      min(c.train.micro_batch_size, c.train.batch_size), trains=r.trains, validate=check, metric=METRIC,
      eval_every=c.train.eval_every, patience=c.train.patience, checkpoint_every=c.train.checkpoint_every,
      seed=c.seed, config=c,
      title=f"{c.name}: {name} ({' + '.join(names)}{'; ' + tasks if tasks else ''})")


def stages(r: Run, workdir: pathlib.Path) -> list[trainer.Stage]:
  """Stage I on the `data.mixture` datasets in WORKDIR/mixture, stage II on `data.dataset` in WORKDIR; a stage
  with 0 steps is left out (the ablation without the multi-domain stage; both out: the zero-shot LLM)."""
  c = r.config
  out = []
  if c.calrec.mixture.steps > 0:
    out.append(stage(r, "mixture", list(c.data.mixture), c.calrec.mixture, workdir / "mixture", workdir))
  if c.calrec.target.steps > 0:
    out.append(stage(r, "target", [c.data.dataset], c.calrec.target, workdir, workdir))
  return out


def evaluate_split(r: Run, split: str, workdir: pathlib.Path, n: int) -> dict[str, Any]:
  """Dense and generation+BM25 metrics of the model as it is on `n` seeded users of `split` (per `config.eval`);
  the generated texts and top 10 go to WORKDIR/eval/<split>_generations.jsonl."""
  c, e = r.config, r.config.eval
  xs = subset(r, split, n)
  out: dict[str, Any] = {"count": len(xs)}
  if e.dense:
    out["dense"] = dense_metrics(r, r.model, xs, workdir)
  if e.generation:
    texts = generate_items(r.model.llm, r.tokenizer, r.target, xs, r.layout, num_samples=e.num_samples,
                           num_beams=e.num_beams, temperature=e.temperature, top_p=e.top_p,
                           key=jax.random.key(c.seed), batch_size=c.train.eval_batch_size,
                           tokens=r.tokens[r.target.name])
    lists = rankings_from_texts(r.target, xs, texts, exclude_history=e.exclude_history)
    out["generation"] = list_metrics(lists, xs)
    if jax.process_index() == 0:
      (workdir / "eval").mkdir(parents=True, exist_ok=True)
      rows = [json.dumps({"user": ex.user, "target": ex.target, "texts": t, "top10": lst[:10]})
              for ex, t, lst in zip(xs, texts, lists)]
      checkpoint.write_text(workdir / "eval" / f"{split}_generations.jsonl", "".join(x + "\n" for x in rows))
  return out


def train(config: ConfigDict, workdir: str | pathlib.Path, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The stages through `trainer.run` (resumable at any step; a finished stage is restored, not rerun), then the
  best model's valid (dense) and test metrics; writes and returns the summary (a finished run returns it)."""
  workdir, t0 = pathlib.Path(workdir), time.time()
  check_config(config)
  datasets = load_datasets(config)  # a missing dataset stops here, before the run folder is made
  def build_run():
    r = build(config, datasets)
    return r, stages(r, workdir), r.model, r.mesh

  def finish(r: Run, summaries: list[dict]) -> dict[str, Any]:
    c = config
    summary = {"dataset": c.data.dataset, "finetune": c.calrec.finetune, "loss_weights": dict(c.calrec.loss_weights),
               **({"tasks": {k: v for k, v in task_ratios(c).items() if v}} if aux_tasks(c) else {}),
               "stages": [{k: s[k] for k in ("stage", "steps", "best_step", f"valid_{METRIC}", "stopped", "wall_s")}
                          for s in summaries],
               "valid": {"dense": dense_metrics(r, r.model, subset(r, "valid", c.data.valid_size), workdir)}}
    if c.data.test_size != 0:
      summary["test"] = evaluate_split(r, "test", workdir, c.data.test_size)
    return summary | {"wall_s": time.time() - t0}

  return trainer.run_once(config, workdir, SUMMARY, build_run, finish, log)


def restore(r: Run, workdir: pathlib.Path) -> None:
  """Puts the run's final parameters (its last stage's best checkpoint) into `r.model`; none for a run without
  stages (the untrained model)."""
  run_stages = stages(r, workdir)
  if run_stages:
    trainer.restore_best(run_stages[-1], r.model)


def evaluate(config: ConfigDict, workdir: str | pathlib.Path, split: str = "test", n: int | None = None) -> dict:
  """Dense and generation metrics of a trained run (or of the untrained model, for a config without stages) on
  `n` (default `data.test_size`) seeded users of `split`, with `config.eval`'s settings."""
  workdir = pathlib.Path(workdir)
  runconfig.check_model(config, workdir)
  r = build(config)
  restore(r, workdir)
  return evaluate_split(r, split, workdir, config.data.test_size if n is None else n)


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run lines: each stage, then valid (dense) and test (dense, generation + BM25) metrics."""
  if summary.get("preempted"):
    return f"preempted at step {summary['steps']} of {summary['stage']}: run the same command again to continue"
  lines = [f"{'dataset':<22}{summary['dataset']} ({summary['finetune']}; loss weights "
           + ", ".join(f"{k} {v:g}" for k, v in summary["loss_weights"].items()) + ")"]
  if "tasks" in summary:
    lines.append(f"{'tasks':<22}" + ", ".join(f"{k} {v:g}" for k, v in summary["tasks"].items()))
  for s in summary["stages"]:
    lines.append(f"{'stage ' + s['stage']:<22}{s['steps']} steps, best {s['best_step']} (valid {METRIC} "
                 f"{s[f'valid_{METRIC}']:.4f}), stopped by {s['stopped']}, {s['wall_s'] / 60:.1f} min")
  if not summary["stages"]:
    lines.append(f"{'stages':<22}none: the model as loaded (zero-shot)")
  rows = [("valid, dense", summary["valid"], "dense")]
  if "test" in summary:
    rows += [("test, dense", summary["test"], "dense"), ("test, generation+BM25", summary["test"], "generation")]
  for label, part, kind in rows:
    if kind in part:
      m = part[kind]
      lines.append(f"{label:<22}" + "  ".join(f"{k} {m[k]:.4f}" for k in ("Recall@1", "Recall@5", "Recall@10",
                                                                           "NDCG@5", "NDCG@10"))
                   + f"  ({m['count']} users)")
  return "\n".join(lines)
