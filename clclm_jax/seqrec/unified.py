"""Unified prompts (RSLLM, arXiv 2412.16933; LLaRA's hybrid prompts, arXiv 2312.02445) for the candidate task.

After each item line's title in a prompt (history items and candidates; never in answers) sits one placeholder
token (`data/candidates.py`, `PromptTokens.spans(soft=True)`); its input embedding is the item's embedding from the
project's pretrained ID encoder (SASRec / CL4SRec, `contrastive/pretrain.py`, frozen) through a trained projector
(`contrastive.fusion.Projector`: Linear, GELU, Linear to the LLM width, RMS-scaled to the token embeddings),
placed by the fused prompts' `fusion.place_soft_tokens`. `UnifiedRec` is the LLM with LoRA, the encoder and the
projector; without soft items it is exactly its LLM, so the text-only stage 1 and the unified stage 2 share it.

Training (`seqrec/candidates.py`, stages of the one trainer): first the ID encoder's pretraining (`encoder_stage`,
or its finished checkpoint restored), then stage 1 trains LoRA on text-only prompts with `answer_lm`; stage 2
trains LoRA and the projector on unified prompts, optionally with LLaRA's curriculum (the share of unified rows in
a batch rising linearly from 0 at the stage's first batch to 1 at its last, `soft_share`), with, from one forward
of the batch (`answer_terms`):
  `answer_lm`  next-token CE on the answer lines (`contrastive.losses.target_ce`);
  `user_cl`    InfoNCE (`contrastive.losses.info_nce`: in-batch, cosine, temperature `user_temperature`)
               between the LLM's mean final state over a rec prompt's history lines and the encoder's user
               representation of those items (its pretraining pooling) through the projector;
  `item_cl`    InfoNCE (`item_temperature`) between the LLM's mean final state over an item line's title
               tokens (causal: the title does not see its own soft token) and the item's projected ID embedding,
               over the batch's item lines (an item repeated in the batch counts once).
Scoring and generation (`candidate_scores`, `generate_answers` with `soft=True`: greedy, sampled or beam search
through `SoftPrompted`) read the same unified prompts.
"""

import dataclasses
import importlib
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.contrastive import losses, pretrain
from clclm_jax.contrastive.encoder import SeqEncoder
from clclm_jax.contrastive.fusion import Projector, place_soft_tokens
from clclm_jax.data import nextitem, sequences
from clclm_jax.model.llama import KVCache, Llama
from clclm_jax.train import trainer
from clclm_jax.train.errors import ConfigError

USER_CL, ITEM_CL = "user_cl", "item_cl"


@dataclasses.dataclass(frozen=True)
class UnifiedSettings:
  """What the unified model and its losses read beside the batch (static: part of the compiled step)."""

  placeholder_id: int
  pooling: str = "last"  # the encoder's user representation, as its pretraining pooled it
  user_temperature: float = 0.1
  item_temperature: float = 0.1
  same_side_negatives: bool = True  # NT-Xent (True) or CLIP's loss, negatives from the other side only (False)


class UnifiedRec(nnx.Module):
  """The LLM (frozen base + LoRA), the pretrained ID encoder (frozen: no stage trains it, and no gradient reaches
  it) and the projector of its item embeddings to one soft token each. Called like `Llama` where the scorers and
  the losses call it; `soft_item_ids_bk` (the items of each row's placeholders, in order) fills the placeholders."""

  def __init__(self, llm: Llama, encoder: SeqEncoder, settings: UnifiedSettings, projector_hidden: int, *,
               rngs: nnx.Rngs):
    self.llm, self.encoder, self.settings = llm, encoder, settings
    table_vd = llm.embed_tokens.embedding[...].astype(jnp.float32)
    out_rms = float(jnp.sqrt(jnp.mean(table_vd * table_vd)))
    d_in = encoder.embed_positions[...].shape[1]
    self.projector = Projector(d_in, llm.config.hidden_size, 1, projector_hidden, out_rms, rngs=rngs)

  @property
  def config(self):
    return self.llm.config

  def project(self, z_xe: jax.Array) -> jax.Array:
    """Encoder-space vectors `[..., e]` -> LLM input space `[..., d]` (the projector's one output token)."""
    return self.projector(jax.lax.stop_gradient(z_xe))[..., 0, :]

  def item_embeds(self, item_ids_xk: jax.Array) -> jax.Array:
    """The projected ID embeddings `[..., k, d]` of items (the encoder's item table rows)."""
    return self.project(self.encoder.item_table()[item_ids_xk])

  def user_embeds(self, history_ids_bl: jax.Array) -> jax.Array:
    """The encoder's user representation of left-padded histories, projected `[b, d]` (no dropout: frozen)."""
    return self.project(self.encoder.encode(history_ids_bl, pooling=self.settings.pooling))

  def inputs_embeds(self, tokens_bt: jax.Array, soft_item_ids_bk: jax.Array) -> jax.Array:
    """Token embeddings with the j-th placeholder of each row replaced by its j-th item's soft token."""
    return place_soft_tokens(self.llm.embed(tokens_bt), tokens_bt, self.item_embeds(soft_item_ids_bk),
                             self.settings.placeholder_id)

  def hidden_states(self, tokens_bt, positions_bt=None, attention_mask_bt=None, *, soft_item_ids_bk=None,
                    dropout_key=None, rows_b=None) -> jax.Array:
    embeds = None if soft_item_ids_bk is None else self.inputs_embeds(tokens_bt, soft_item_ids_bk)
    return self.llm.hidden_states(None if embeds is not None else tokens_bt, positions_bt, attention_mask_bt,
                                  inputs_embeds_btd=embeds, dropout_key=dropout_key, rows_b=rows_b)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return self.llm.init_cache(batch, max_len)

  def decode(self, tokens_bt, cache: KVCache, index, attention_mask_bt=None, *, positions_bt=None,
             last_only: bool = False, inputs_embeds_btd=None):
    return self.llm.decode(tokens_bt, cache, index, attention_mask_bt, positions_bt=positions_bt,
                           last_only=last_only, inputs_embeds_btd=inputs_embeds_btd)

  def lm_logits(self, h_xd: jax.Array) -> jax.Array:
    return self.llm.lm_logits(h_xd)

  def token_nll(self, h_nd: jax.Array, targets_n: jax.Array) -> jax.Array:
    return self.llm.token_nll(h_nd, targets_n)


class SoftItemIds(nnx.Variable):
  """int32 `[b, k]`: the items whose soft tokens fill each prompt row's placeholders, in order."""


class SoftPrompted(nnx.Module):
  """A `UnifiedRec` with its prompts' soft items bound (row i: prompt i's), as `model.generate.generate` calls a
  model in every mode. The prefill (one row per prompt, before any row is repeated) fills the placeholders; the
  model never writes one (its logit is -inf), so the decode steps (one token a row) are plain tokens and the rows
  `generate` makes of a prompt (samples, beams) carry its soft tokens in the cache they copy from its prefill."""

  def __init__(self, model: UnifiedRec, soft_item_ids_bk):
    self.model = model
    self.ids = SoftItemIds(jnp.asarray(soft_item_ids_bk, jnp.int32))

  @property
  def config(self):
    return self.model.config

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return self.model.init_cache(batch, max_len)

  def decode(self, tokens_bt, cache: KVCache, index, attention_mask_bt=None, *, positions_bt=None,
             last_only: bool = False):
    prefill = tokens_bt.shape[1] > 1  # decode steps feed one generated token a row: never a placeholder
    if prefill and tokens_bt.shape[0] != self.ids.shape[0]:
      raise ValueError(f"a prefill of {tokens_bt.shape[0]} rows for {self.ids.shape[0]} bound prompts: prefill "
                       "one row per prompt, then repeat its cache rows (as `generate` does for samples and beams)")
    embeds = self.model.inputs_embeds(tokens_bt, self.ids[...]) if prefill else None
    return self.model.decode(tokens_bt, cache, index, attention_mask_bt, positions_bt=positions_bt,
                             last_only=last_only, inputs_embeds_btd=embeds)

  def lm_logits(self, h_xd: jax.Array) -> jax.Array:
    return self.model.lm_logits(h_xd).at[..., self.model.settings.placeholder_id].set(-jnp.inf)


def trains_projector(path, value) -> bool:
  """Stage 2's nnx filter: LoRA and the projector (the encoder and the base stay as they are)."""
  return isinstance(value, nnx.LoRAParam) or (isinstance(value, nnx.Param) and path[0] == "projector")


# --- Losses ---------------------------------------------------------------------------------------

def title_states(h_btd: jax.Array, item_slot_bt: jax.Array, k: int) -> jax.Array:
  """`[b, k, d]` the mean state over each item slot's title tokens (`item_slot` = slot + 1 there)."""
  onehot_btk = (item_slot_bt[..., None] == jnp.arange(1, k + 1)).astype(jnp.float32)
  sums_bkd = jnp.einsum("btk,btd->bkd", onehot_btk, h_btd.astype(jnp.float32))
  return sums_bkd / jnp.maximum(onehot_btk.sum(1), 1.0)[..., None]


def user_cl(model: UnifiedRec, h_btd: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """InfoNCE between the LLM's pooled history state and the encoder's projected user representation."""
  text_bd = losses.masked_mean(h_btd, batch["history_mask"])
  return losses.info_nce(text_bd, model.user_embeds(batch["history_ids"]), similarity="cosine",
                         temperature=model.settings.user_temperature, valid_n=batch["user_valid"] > 0,
                         same_side=model.settings.same_side_negatives)


def item_cl(model: UnifiedRec, h_btd: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """InfoNCE between the LLM's mean state over each item line's title and the item's projected ID embedding."""
  ids_bk = batch["item_ids"]
  text_bkd = title_states(h_btd, batch["item_slot"], ids_bk.shape[1])
  id_bkd = model.item_embeds(ids_bk)
  d = text_bkd.shape[-1]
  return losses.info_nce(text_bkd.reshape(-1, d), id_bkd.reshape(-1, d), similarity="cosine",
                         temperature=model.settings.item_temperature, valid_n=batch["item_valid"].reshape(-1) > 0,
                         same_side=model.settings.same_side_negatives)


def answer_terms(model, batch: Mapping[str, jax.Array], key: jax.Array | None, names: Sequence[str],
                 lm_name: str) -> dict[str, jax.Array]:
  """The asked terms of one forward of the batch's prompts (soft tokens where the batch has soft items):
  `lm_name` (the answer's CE), `user_cl`, `item_cl`. A plain `Llama` (text-only runs) takes the CE only."""
  if "soft_item_ids" in batch:
    h_btd = model.hidden_states(batch["tokens"], None, batch["attention_mask"],
                                soft_item_ids_bk=batch["soft_item_ids"], dropout_key=key)
  else:
    h_btd = model.hidden_states(batch["tokens"], None, batch["attention_mask"], dropout_key=key)
  terms = {lm_name: losses.target_ce(model, h_btd, batch)} if lm_name in names else {}
  for name, fn in ((USER_CL, user_cl), (ITEM_CL, item_cl)):
    if name in names:
      if not isinstance(model, UnifiedRec) or "item_ids" not in batch:
        raise ValueError(f"the {name} loss needs unified prompts (config.unified.enabled, stage 2)")
      terms[name] = fn(model, h_btd, batch)
  return terms


# --- The curriculum ----------------------------------------------------------------------------------

def soft_share(steps: int, curriculum: bool) -> Callable[[int], float]:
  """The share of unified prompts in stage 2's batch t (0-based): LLaRA's curriculum rises linearly from 0 at the
  first batch to 1 at the last (`steps` batches); without it every prompt is unified."""
  if not curriculum:
    return lambda t: 1.0
  return lambda t: min(1.0, t / max(steps - 1, 1))


# --- The encoder and the model ------------------------------------------------------------------------

def encoder_config(config: ConfigDict) -> ConfigDict:
  """The ID encoder's pretraining config: `configs/<unified.encoder_config>.py` with `unified.encoder_overrides`;
  its dataset must be the run's."""
  u = config.unified
  try:
    cfg = importlib.import_module(f"configs.{u.encoder_config}").get_config()
  except ModuleNotFoundError:
    raise ConfigError(f"config.unified.encoder_config={u.encoder_config!r}: no configs/{u.encoder_config}.py; use "
                      f"an encoder pretraining config, e.g. 'pretrain_{config.data.dataset}'") from None
  if "dataset" not in cfg or "hidden" not in cfg:
    raise ConfigError(f"config.unified.encoder_config={u.encoder_config!r} is not an encoder pretraining config "
                      f"(configs/pretrain_*.py)")
  with cfg.unlocked():
    for k, v in u.encoder_overrides.items():
      if k not in cfg:
        raise ConfigError(f"config.unified.encoder_overrides names {k!r}, which configs/{u.encoder_config}.py has "
                          f"not: use one of its fields")
      cfg[k] = tuple(v) if isinstance(cfg[k], tuple) else v
  if cfg.dataset != config.data.dataset:
    raise ConfigError(f"config.unified.encoder_config={u.encoder_config!r} pretrains on {cfg.dataset!r}, the run "
                      f"reads config.data.dataset={config.data.dataset!r}: its item ids are another catalogue's")
  return cfg


def check_items(num_encoder_items: int, data: nextitem.NextItemData, config: ConfigDict) -> None:
  """Every catalogue item needs a row of the encoder's item table (its ID embedding)."""
  if data.num_items > num_encoder_items:
    item = num_encoder_items + 1
    raise ConfigError(f"config.unified.encoder_config={config.unified.encoder_config!r}: item {item} "
                      f"({data.titles[item - 1]!r}) has no ID embedding (the encoder holds items 1..{num_encoder_items},"
                      f" {data.name} has {data.num_items}): pretrain the encoder on {data.name}")


def encoder_folder(config: ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """Where the encoder is pretrained (or restored from): `unified.encoder_workdir`, or WORKDIR/encoder."""
  w = config.unified.encoder_workdir
  return pathlib.Path(w) if w else pathlib.Path(workdir) / "encoder"


def text_folder(config: ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """Stage 1's folder (text-only prompts): `unified.text_workdir`, or WORKDIR/text."""
  w = config.unified.text_workdir
  return pathlib.Path(w) if w else pathlib.Path(workdir) / "text"


def text_stage_config(config: ConfigDict) -> ConfigDict:
  """The config stage 1 saves and is resumed against: the run's less the `unified` block, which text-only prompts
  never read, so a text-only run and the unified runs (and their stage-2 ablations) with the same stage 1 share
  one, and a run whose stage 1 differs stops with the differences."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    del c.unified
  return c


def encoder_stage(config: ConfigDict, data: nextitem.NextItemData,
                  workdir: pathlib.Path) -> tuple[pretrain.NextItemRec, ConfigDict, trainer.Stage]:
  """(the fresh ID encoder in its pretraining model, its config, the pretraining stage): `pretrain.stage` of its
  config in `encoder_folder` on the run's histories (the ids of `sequences.load`, user for user). The stage
  trains that model (`Stage.module`), whose `encoder` the `UnifiedRec` holds too: first in a unified run's stage
  list, it is preempted, resumed or restored (a finished pretraining in that folder) as every stage is, and its
  checkpoints are a plain pretraining's (`pretrain.train`, `pretrained_encoder`)."""
  cfg = encoder_config(config)
  seqs = sequences.SequenceData(data.name, tuple(np.asarray(h, np.int32) for h in data.histories), data.num_items)
  rec = pretrain.NextItemRec(cfg, seqs)
  stage = pretrain.stage(cfg, rec, seqs, encoder_folder(config, workdir))
  return rec, cfg, dataclasses.replace(stage, module=rec)


def pretrained_encoder(config: ConfigDict, data: nextitem.NextItemData, workdir: pathlib.Path, mesh,
                       log: Callable[[str], None] = print) -> tuple[SeqEncoder, ConfigDict, dict]:
  """(encoder, its config, its stage summary): `encoder_stage` alone through the one trainer (benchmarks that
  rank with the encoder; a unified run trains it in its stage list)."""
  rec, cfg, stage = encoder_stage(config, data, workdir)
  summary = trainer.run([stage], rec, mesh, log)[-1]
  return rec.encoder, cfg, summary


def placeholder_id(tokenizer, config: ConfigDict, vocab_size: int) -> int:
  """The token id of `unified.placeholder`: one token of the vocabulary that is no special token the prompts or
  generation use (its embedding is replaced, so text must never hold it: `check_placeholder`)."""
  name = config.unified.placeholder
  i = tokenizer.convert_tokens_to_ids(name) if name else None
  specials = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
  if not isinstance(i, int) or not 0 <= i < vocab_size or i in specials - {None}:
    raise ConfigError(f"config.unified.placeholder={name!r} is not one token of the vocabulary apart from its "
                      "pad / eos / bos / unk tokens: use a reserved token ('<reponame>' for SmolLM2)")
  return i


def check_placeholder(pt, ph: int, config: ConfigDict) -> None:
  """No title holds the placeholder token (its embedding would be replaced)."""
  for item, title in enumerate(pt.titles, start=1):
    if ph in title:
      raise ConfigError(f"config.unified.placeholder={config.unified.placeholder!r}: item {item}'s title holds it: "
                        "use a token no text holds")


def build_model(config: ConfigDict, llm: Llama, encoder: SeqEncoder, encoder_cfg: ConfigDict, ph: int,
                data: nextitem.NextItemData) -> UnifiedRec:
  """The `UnifiedRec` of `config.unified` around the LLM and the pretrained encoder (placeholder token `ph`)."""
  check_items(encoder.item_table().shape[0] - 2, data, config)
  u = config.unified
  settings = UnifiedSettings(ph, encoder_cfg.pooling, u.user_temperature, u.item_temperature, u.same_side_negatives)
  return UnifiedRec(llm, encoder, settings, u.projector_hidden, rngs=nnx.Rngs(config.seed))
