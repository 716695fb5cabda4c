"""LLaRA's candidate ranking task (arXiv 2312.02445) with a text-only LoRA LLM through the one trainer, and its
metrics: HitRatio@1 and ValidRatio of the generated answer, and a decoding-free HitRatio@1.

Training: one stage (`candidates.steps` updates) on batches of `data/auxtasks.py` mixing the rec prompts of
`data/candidates.py` with the auxiliary-task prompts at `tasks.ratios`; the loss is `answer_lm` (next-token CE on
the answer lines and their newlines only, `contrastive.losses.target_ce`); LoRA factors train. Validation: the
decoding-free HitRatio@1 on `data.valid_size` seeded validation users picks the best checkpoint.

Metrics over the `num_candidates` candidates of an example (the target among them, `data.candidate_seed`):
  `HitRatio@1_scored`  the target has the highest log-likelihood `sum log p(title + newline | prompt)` (ties go
                       to the earlier candidate in the prompt; candidates are in a random order): no decoding;
                       with `eval.per_token` the mean over the answer's tokens instead of the sum;
  `HitRatio@1`         the generated answer (up to its newline; greedy, sampled or the best beam: `eval.temperature`,
                       `eval.top_p`, `eval.num_beams`) names the target;
  `ValidRatio`         the generated answer names one of the candidates.
An answer names a candidate when its text equals the candidate's title as the prompt's tokens decode it
(lower-cased, whitespace collapsed), else when exactly one candidate's title occurs in it (LLaRA's rule).
Popularity (training-split counts) ranks the same candidates as the no-LLM reference; `encoder_scores` lets a
pretrained ID encoder (SASRec / CL4SRec) rank them too.

The decoding-free scores run the prompt once per user (`Llama.decode` into a key/value cache), repeat the cache
for the candidates and run every candidate's answer in one more call: one compiled program per prompt width.
"""

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.contrastive.encoder import SeqEncoder
from clclm_jax.data import auxtasks, nextitem, nextitem_tokens, sequences
from clclm_jax.data import candidates as cand_data
from clclm_jax.data.candidates import CandidateExample, Layout, PromptTokens
from clclm_jax.model import build as model_build
from clclm_jax.model import generate as generate_lib
from clclm_jax.model.llama import KVCache, Llama
from clclm_jax.seqrec import baselines, unified
from clclm_jax.train import checkpoint, runconfig, sharding, trainer
from clclm_jax.train.evaluate import progress
from clclm_jax.train.errors import ConfigError
from clclm_jax.train.step import register_loss

LOSS = "answer_lm"
SCORED, HIT, VALID = "HitRatio@1_scored", "HitRatio@1", "ValidRatio"
METRIC = SCORED  # the validation metric that picks the best checkpoint
SUMMARY = "summary.json"


@register_loss(LOSS, unified.USER_CL, unified.ITEM_CL, per_token=(LOSS,))
def answer_losses(model: Llama | unified.UnifiedRec, batch, key: jax.Array | None,
                  names: Sequence[str]) -> dict[str, jax.Array]:
  """From one forward of the batch's prompts (soft tokens where it has soft items): `answer_lm`, the next-token CE
  on the answer lines and their newlines only (`target_index`; the LM head runs on those), and the unified
  prompts' `user_cl` / `item_cl` (`seqrec/unified.py`)."""
  return unified.answer_terms(model, batch, key, names, LOSS)


# --- Decoding-free scores --------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _scores(graphdef, state, prompt_up, prompt_mask_up, answer_ucw, answer_mask_ucw, soft_uk=None) -> jax.Array:
  """[u, c] sum of log p of each candidate's answer tokens after its user's prompt (soft tokens from `soft_uk`
  at its placeholders: unified prompts, `llm` a `unified.UnifiedRec`)."""
  llm = nnx.merge(graphdef, state)
  u, p = prompt_up.shape
  c, w = answer_ucw.shape[1:]
  embeds = None if soft_uk is None else llm.inputs_embeds(prompt_up, soft_uk)
  h_last_ud, cache = llm.decode(prompt_up, llm.init_cache(u, p + w), 0, prompt_mask_up, last_only=True,
                                inputs_embeds_btd=embeds)
  rows = functools.partial(jnp.repeat, repeats=c)  # user-major: row i * c + j is user i's candidate j
  cache = KVCache(rows(cache.k_lbskd, axis=1), rows(cache.v_lbskd, axis=1), rows(cache.valid_bs, axis=0))
  tokens_nw, mask_nw = answer_ucw.reshape(u * c, w), answer_mask_ucw.reshape(u * c, w)
  h_nwd, _ = llm.decode(tokens_nw, cache, p, mask_nw)
  # Token j of an answer is predicted by the state before it: the prompt's last for j = 0.
  h_pred_nwd = jnp.concatenate([rows(h_last_ud, axis=0)[:, None], h_nwd[:, :-1]], axis=1)
  nll_nw = llm.token_nll(h_pred_nwd.reshape(u * c * w, -1), tokens_nw.reshape(-1)).reshape(u * c, w)
  return -(nll_nw * mask_nw).sum(-1).reshape(u, c)


def candidate_scores(llm: Llama | unified.UnifiedRec, pt: PromptTokens, data: nextitem.NextItemData,
                     examples: Sequence[CandidateExample], layout: Layout, *, batch_size: int = 4,
                     per_token: bool = False, soft: bool = False) -> np.ndarray:
  """[len(examples), num_candidates] log-likelihood of each candidate's title (and newline) as the answer, or
  with `per_token` its mean over the answer's tokens (the sum is lower for longer titles); `batch_size` users a call
  (the last call filled with its last user: one shape per prompt width). With `soft`, unified prompts (each item
  line's title followed by its soft token; `llm` a `unified.UnifiedRec`)."""
  graphdef, state = nnx.split(llm)
  out = []
  for start in progress(range(0, len(examples), batch_size), "candidate likelihoods"):
    part = list(examples[start:start + batch_size])
    b = cand_data.score_batch(pt, data, part + [part[-1]] * (batch_size - len(part)), layout, soft)
    scores = _scores(graphdef, state, b["prompt"], b["prompt_mask"], b["answer"], b["answer_mask"],
                     b.get("soft_item_ids"))
    scores = np.asarray(scores, np.float64) / (b["answer_mask"].sum(-1) if per_token else 1)
    out.append(scores[:len(part)])
  return np.concatenate(out) if out else np.zeros((0, 0))


def target_ranks(scores_uc: np.ndarray, examples: Sequence[CandidateExample]) -> np.ndarray:
  """0-based rank of each target among its candidates: those scored higher, plus equal ones listed earlier."""
  scores_uc = np.asarray(scores_uc)
  col_u = np.asarray([ex.candidates.index(ex.target) for ex in examples])
  target_u1 = np.take_along_axis(scores_uc, col_u[:, None], axis=1)
  ahead = (scores_uc > target_u1) | ((scores_uc == target_u1) & (np.arange(scores_uc.shape[1]) < col_u[:, None]))
  return ahead.sum(1)


def popularity_scores(data: nextitem.NextItemData, examples: Sequence[CandidateExample]) -> np.ndarray:
  """[u, c] each candidate's count in the training histories (`baselines.popularity_scores`)."""
  counts = baselines.popularity_scores(data)
  return np.asarray([[counts[i - 1] for i in ex.candidates] for ex in examples], np.float64)


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _encoder_scores(graphdef, state, items_bl, candidates_bc, *, pooling):
  encoder = nnx.merge(graphdef, state)
  user_bd = encoder.encode(items_bl, pooling=pooling)
  return jnp.einsum("bd,bcd->bc", user_bd, encoder.item_table()[candidates_bc])


def encoder_scores(encoder: SeqEncoder, examples: Sequence[CandidateExample], *, pooling: str = "last",
                   batch_size: int = 256) -> np.ndarray:
  """[u, c] the ID encoder's (SASRec / CL4SRec, `contrastive.encoder.SeqEncoder`, ids as `sequences.py`'s, which
  are `nextitem`'s) next-item scores of each example's candidates: the pooled history (its last `max_len`
  items) against the item table, as its full-catalogue ranking scores them."""
  graphdef, state = nnx.split(encoder)
  out = []
  for start in range(0, len(examples), batch_size):
    part = list(examples[start:start + batch_size])
    part += [part[-1]] * (batch_size - len(part))  # one shape
    items_bl, _ = sequences.pad([np.asarray(ex.history) for ex in part], encoder.max_len)
    cands_bc = np.asarray([ex.candidates for ex in part], np.int32)
    scores = _encoder_scores(graphdef, state, items_bl, cands_bc, pooling=pooling)
    out.append(np.asarray(scores, np.float64)[:min(batch_size, len(examples) - start)])
  return np.concatenate(out) if out else np.zeros((0, 0))


# --- Generated answers -----------------------------------------------------------------------------

def normalize(text: str) -> str:
  return " ".join(text.lower().split())


def named_candidate(answer: str, titles: Sequence[str]) -> int | None:
  """The index of the candidate an answer names (module docstring), or None."""
  answer = normalize(answer)
  titles = [normalize(t) for t in titles]
  if answer in titles:
    return titles.index(answer)
  inside = [i for i, t in enumerate(titles) if t and t in answer]
  return inside[0] if len(inside) == 1 else None


def generate_answers(llm: Llama | unified.UnifiedRec, pt: PromptTokens, data: nextitem.NextItemData,
                     examples: Sequence[CandidateExample], layout: Layout, *, batch_size: int = 8,
                     soft: bool = False, temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1,
                     key: jax.Array | None = None) -> list[str]:
  """The answer line of each example's rec prompt (`batch_size` prompts a call, one shape per width): greedy; with
  `temperature > 0` one sample (nucleus `top_p`; call c draws with `fold_in(key, c)`); with `num_beams > 1` the
  best beam. With `soft` the unified prompt (`llm` a `unified.UnifiedRec`, its soft items bound per call:
  `unified.SoftPrompted`)."""
  recs = [cand_data.rec_prompt(data, ex, layout.max_history) for ex in examples]
  prompts = [pt.prompt(p, soft) for p in recs]
  soft_ids = cand_data.soft_item_ids(recs, layout.max_items) if soft else None
  tok = pt.tokenizer
  eos = tok.eos_token_id if tok.eos_token_id is not None else llm.config.eos_token_id
  stops = sorted({*generate_lib.newline_token_ids(tok), *([] if eos is None else [eos])})
  stops = [i for i in stops if i < llm.config.vocab_size]
  out = []
  for start in progress(range(0, len(prompts), batch_size), "generating"):
    part = prompts[start:start + batch_size]
    model = llm
    if soft:
      ids = soft_ids[start:start + batch_size]
      model = unified.SoftPrompted(llm, np.concatenate([ids, np.repeat(ids[-1:], batch_size - len(part), 0)]))
    g = generate_lib.generate(model, tok, part + [part[-1]] * (batch_size - len(part)),
                              max_new_tokens=pt.line_bound(), temperature=temperature, top_p=top_p,
                              key=None if key is None else jax.random.fold_in(key, start // batch_size),
                              num_beams=num_beams, stop_token_ids=stops, pad_to_multiple_of=layout.pad_multiple)
    out += [texts[0].split("\n", 1)[0].strip() for texts in g.texts_br[:len(part)]]
  return out


def answer_metrics(answers: Sequence[str], examples: Sequence[CandidateExample],
                   pt: PromptTokens) -> dict[str, float]:
  """HitRatio@1 and ValidRatio of generated answers."""
  picks = [named_candidate(a, [pt.title_text(c) for c in ex.candidates]) for a, ex in zip(answers, examples)]
  hit = [p is not None and ex.candidates[p] == ex.target for p, ex in zip(picks, examples)]
  return {HIT: float(np.mean(hit)) if hit else float("nan"),
          VALID: float(np.mean([p is not None for p in picks])) if picks else float("nan")}


def hit_ratio(ranks: np.ndarray) -> float:
  return float(np.mean(np.asarray(ranks) == 0)) if len(ranks) else float("nan")


# --- A run from a config ---------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """What the stages and the evaluations of a run share. `model` is what trains and answers: the LLM, or with
  `config.unified.enabled` the `unified.UnifiedRec` around it (`soft`: its prompts are unified)."""

  config: ConfigDict
  llm: Llama
  data: nextitem.NextItemData
  pt: PromptTokens
  layout: Layout
  settings: auxtasks.TaskSettings
  mesh: Any
  model: Any = None
  encoder_stage: trainer.Stage | None = None  # unified runs: the ID encoder's pretraining, their first stage

  @property
  def soft(self) -> bool:
    return self.model is not self.llm


def unified_on(config: ConfigDict) -> bool:
  return "unified" in config and bool(config.unified.enabled)


def check_config(config: ConfigDict) -> None:
  """Stops on a bad value with one line naming the field, before anything is built or written."""
  runconfig.validate(config)
  d, t = config.data, config.tasks
  if d.dataset in nextitem.ID_ONLY_DATASETS:
    raise ConfigError(f"config.data.dataset={d.dataset!r} has no item titles (ID-only: configs/pretrain_*.py); the "
                      f"candidate task reads item text: use one of {sorted(nextitem.TEXT_DATASETS)}")
  if d.dataset not in nextitem.TEXT_DATASETS:
    raise ConfigError(f"config.data.dataset={d.dataset!r} is not a dataset with item text: use one of "
                      f"{sorted(nextitem.TEXT_DATASETS)}")
  try:
    auxtasks.check_tasks(t)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if d.num_candidates < 2:
    raise ConfigError(f"config.data.num_candidates={d.num_candidates}: use 2 or more (LLaRA: 20)")
  for field in ("max_item_tokens", "max_prompt_tokens", "pad_multiple"):
    if d[field] < 1:
      raise ConfigError(f"config.data.{field}={d[field]}: use 1 or more")
  check_decoding(config.eval)
  for field, value in (("data.max_history", d.max_history), ("data.max_prefixes", d.max_prefixes),
                       ("candidates.steps", config.candidates.steps)):
    if value < 0:
      raise ConfigError(f"config.{field}={value}: use 0 or more")
  if unified_on(config):
    check_unified(config)


def check_decoding(e: ConfigDict) -> None:
  """The generated answers' decoding fields of `config.eval` (one line naming the field)."""
  if not (isinstance(e.num_beams, int) and e.num_beams >= 1):
    raise ConfigError(f"config.eval.num_beams={e.num_beams!r}: use 1 (greedy or sampling) or more (beam search)")
  if not e.temperature >= 0:
    raise ConfigError(f"config.eval.temperature={e.temperature}: use 0 (greedy) or above (sampling)")
  if not 0 < e.top_p <= 1:
    raise ConfigError(f"config.eval.top_p={e.top_p}: use a share in (0, 1]")
  if e.num_beams > 1 and e.temperature > 0:
    raise ConfigError(f"config.eval.temperature={e.temperature} with num_beams={e.num_beams}: beam search does not "
                      "sample; use temperature 0 or num_beams 1")


def check_unified(config: ConfigDict) -> None:
  """The `unified` block's fields (one line naming the field)."""
  u = config.unified
  if u.steps < 0:
    raise ConfigError(f"config.unified.steps={u.steps}: use 0 or more")
  if u.projector_hidden < 1:
    raise ConfigError(f"config.unified.projector_hidden={u.projector_hidden}: use 1 or more")
  for field in ("user_temperature", "item_temperature"):
    if not u[field] > 0:
      raise ConfigError(f"config.unified.{field}={u[field]}: use a temperature above 0")
  weights = dict(u.loss_weights)
  known = (LOSS, unified.USER_CL, unified.ITEM_CL)
  if set(weights) - set(known):
    raise ConfigError(f"config.unified.loss_weights names unknown losses {sorted(set(weights) - set(known))}: use "
                      f"{list(known)}")
  if not all(isinstance(v, (int, float)) and np.isfinite(v) and v >= 0 for v in weights.values()) or not any(
      weights.values()):
    raise ConfigError(f"config.unified.loss_weights={weights}: weights must be finite, 0 or more (0: off), and one "
                      "above 0")
  unified.encoder_config(config)


def check_lengths(config: ConfigDict, pt: PromptTokens, kind: str) -> None:
  """Every prompt of the asked tasks must fit `data.max_prompt_tokens` (the longest title and the longest
  history; unified prompts with their soft tokens): no prompt is cut silently."""
  s = auxtasks.settings(config)
  tasks, _ = auxtasks.mixture(dict(config.tasks.ratios))
  for task in dict.fromkeys(("rec", *tasks)):  # rec: the evaluation prompts
    need = auxtasks.prompt_bound(pt, kind, task, s, unified_on(config))
    if need > config.data.max_prompt_tokens:
      raise ConfigError(f"config.data.max_prompt_tokens={config.data.max_prompt_tokens}: {task} prompts may take "
                        f"{need} tokens (max_history={s.max_history}, num_candidates={s.num_candidates}, "
                        f"max_item_tokens={config.data.max_item_tokens}): raise it or lower those")


def build(config: ConfigDict, data: nextitem.NextItemData | None = None,
          workdir: str | pathlib.Path | None = None) -> Run:
  """The LLM with LoRA, the dataset's prompt tokens, the mesh; with `config.unified.enabled`, the `UnifiedRec`
  around the LLM and a fresh ID encoder, with the encoder's pretraining stage (`unified.encoder_stage`, in
  `unified.encoder_folder(config, workdir)`), which `stages` puts first."""
  check_config(config)
  sharding.maybe_initialize_distributed(config)
  data = data if data is not None else nextitem.load(config.data.dataset)
  d = config.data
  s = auxtasks.settings(config)
  tasks, _ = auxtasks.mixture(dict(config.tasks.ratios))
  soft = unified_on(config)
  layout = Layout(d.max_history, d.max_prompt_tokens, d.max_item_tokens, d.pad_multiple,
                  auxtasks.answer_lines(tasks, s), auxtasks.max_items(("rec", *tasks), s) if soft else 0)
  llm, tokenizer = model_build.build_model(config)
  mesh = sharding.make_mesh(config.mesh)
  if not soft:
    pt = PromptTokens(data, tokenizer, d.max_item_tokens)
    check_lengths(config, pt, data.kind)
    return Run(config, llm, data, pt, layout, s, mesh, llm)
  if workdir is None:
    raise ValueError("a unified run needs its workdir (the ID encoder is pretrained or restored there)")
  ph = unified.placeholder_id(tokenizer, config, llm.config.vocab_size)
  pt = PromptTokens(data, tokenizer, d.max_item_tokens, ph)
  unified.check_placeholder(pt, ph, config)
  check_lengths(config, pt, data.kind)
  encoder_rec, encoder_cfg, encoder_stage = unified.encoder_stage(config, data, pathlib.Path(workdir))
  model = unified.build_model(config, llm, encoder_rec.encoder, encoder_cfg, ph, data)
  return Run(config, llm, data, pt, layout, s, mesh, model, encoder_stage)


def subset(r: Run, part: str, n: int) -> list[CandidateExample]:
  """The seeded `n`-user subset (n < 0: all) of `part`'s examples with their candidates (`data.candidate_seed`):
  every method, seed and run scores the same users and candidates."""
  d = r.config.data
  xs = cand_data.candidate_examples(r.data, part, num_candidates=d.num_candidates, seed=d.candidate_seed)
  return xs if n < 0 else baselines.sample_examples(xs, n, d.subset_seed)


def scored_metrics(r: Run, llm: Llama | unified.UnifiedRec, xs: Sequence[CandidateExample],
                   soft: bool | None = None) -> dict[str, float]:
  """The decoding-free HitRatio@1 of `llm` on `xs` (`soft`: unified prompts; default: the run's)."""
  scores = candidate_scores(llm, r.pt, r.data, xs, r.layout, batch_size=r.config.train.eval_batch_size,
                            per_token=r.config.eval.per_token, soft=r.soft if soft is None else soft)
  return {SCORED: hit_ratio(target_ranks(scores, xs)), "count": len(xs)}


def train_examples(r: Run) -> list[nextitem.Example]:
  """Training prefixes (`data.max_prefixes` per user, 0: all) of `data.max_users` seeded users (0: all)."""
  c = r.config
  xs = nextitem.examples(r.data, "train", max_prefixes=c.data.max_prefixes or None, seed=c.seed)
  return nextitem_tokens.limit_users(xs, c.data.max_users, c.seed)


def stages(r: Run, workdir: pathlib.Path) -> list[trainer.Stage]:
  """One LoRA stage on the task mixture (none with 0 steps: the zero-shot LLM), in WORKDIR or, with
  `unified.text_workdir`, in that shared folder. Unified runs: the ID encoder's pretraining (`Run.encoder_stage`),
  that stage on text-only prompts (`unified.text_folder`: WORKDIR/text unless shared), then LoRA and the projector
  on unified prompts (WORKDIR/unified, `unified.steps`, loss weights `unified.loss_weights`; with
  `unified.curriculum` the unified share of each batch rises from 0 to 1 over the stage)."""
  c = r.config
  examples = train_examples(r)
  valid = subset(r, "valid", c.data.valid_size)
  tasks = ", ".join(auxtasks.mixture(dict(c.tasks.ratios))[0])

  def stage(name, folder, layout, weights, steps, trains, soft, soft_share=None, config=c, module=None
            ) -> trainer.Stage:
    batches = lambda: auxtasks.train_batches(r.data, r.pt, examples, dict(c.tasks.ratios),  # noqa: E731
                                             c.train.batch_size, layout, r.settings, c.seed, soft_share=soft_share)
    check = lambda model: {SCORED: scored_metrics(r, model, valid, soft)[SCORED]}  # noqa: E731
    return trainer.Stage(
        name, folder, batches, weights, steps, c.optim, c.train.batch_size,
        min(c.train.micro_batch_size, c.train.batch_size), trains=trains, validate=check, metric=METRIC,
        eval_every=c.train.eval_every, patience=c.train.patience, checkpoint_every=c.train.checkpoint_every,
        seed=c.seed, config=config, title=f"{c.name}: {name} ({tasks})", module=module)
  u = c.unified
  # The text-only stage trains the LLM itself (its LoRA tree is a text-only run's), in a folder that a text-only
  # run and the unified runs of the same stage 1 may share (`unified.text_workdir`).
  text_layout = dataclasses.replace(r.layout, max_items=0)
  text = lambda: stage("text", unified.text_folder(c, workdir), text_layout,  # noqa: E731
                       {LOSS: 1.0}, c.candidates.steps, nnx.LoRAParam, False, config=unified.text_stage_config(c),
                       module=r.llm)
  if not r.soft:  # a text-only run: that stage when it names a shared folder, else its own in WORKDIR
    one = text() if u.text_workdir else stage("candidates", workdir, r.layout, {LOSS: 1.0}, c.candidates.steps,
                                               nnx.LoRAParam, False)
    return [one][:int(c.candidates.steps > 0)]
  out = [r.encoder_stage]
  if c.candidates.steps > 0:
    out.append(text())
  if u.steps > 0:
    out.append(stage("unified", workdir / "unified", r.layout, dict(u.loss_weights), u.steps,
                     unified.trains_projector, True, unified.soft_share(u.steps, u.curriculum)))
  return out


def evaluate_split(r: Run, split: str, workdir: pathlib.Path, n: int) -> dict[str, Any]:
  """Decoding-free HitRatio@1 of the model and of popularity, and (with `eval.generation`) the generated
  answers' HitRatio@1 / ValidRatio, on `n` seeded users of `split`; answers go to WORKDIR/eval/."""
  xs = subset(r, split, n)
  out: dict[str, Any] = scored_metrics(r, r.model, xs)
  out["popularity"] = {SCORED: hit_ratio(target_ranks(popularity_scores(r.data, xs), xs))}
  e = r.config.eval
  if e.generation:
    answers = generate_answers(r.model, r.pt, r.data, xs, r.layout, batch_size=r.config.train.eval_batch_size,
                               soft=r.soft, temperature=e.temperature, top_p=e.top_p, num_beams=e.num_beams,
                               key=jax.random.key(r.config.seed))
    out.update(answer_metrics(answers, xs, r.pt))
    if jax.process_index() == 0:
      (workdir / "eval").mkdir(parents=True, exist_ok=True)
      picks = [named_candidate(a, [r.pt.title_text(c) for c in ex.candidates]) for a, ex in zip(answers, xs)]
      rows = [json.dumps({"user": ex.user, "target": ex.target, "candidates": ex.candidates, "answer": a,
                          "named": None if p is None else ex.candidates[p]})  # the candidate the answer names
              for ex, a, p in zip(xs, answers, picks)]
      checkpoint.write_text(workdir / "eval" / f"{split}_answers.jsonl", "".join(x + "\n" for x in rows))
  return out


def train(config: ConfigDict, workdir: str | pathlib.Path, log: Callable[[str], None] = print,
          data: nextitem.NextItemData | None = None) -> dict[str, Any]:
  """The stages through `trainer.run` (resumable), then the best model's valid and test metrics; writes and
  returns the summary (a finished run returns it; a preempted stage, the ID encoder's pretraining included,
  returns its stage summary, and the same call resumes it)."""
  workdir, t0 = pathlib.Path(workdir), time.time()
  check_config(config)
  data = data if data is not None else nextitem.load(config.data.dataset)
  def build_run():
    r = build(config, data, workdir)
    return r, stages(r, workdir), r.model, r.mesh

  def finish(r, summaries: list[dict]) -> dict[str, Any]:
    c = config
    encoder, summaries = (summaries[0], summaries[1:]) if r.soft else (None, summaries)  # `stages`' order
    valid = subset(r, "valid", c.data.valid_size)
    best = summaries[-1][f"valid_{METRIC}"] if summaries else None
    summary = {"dataset": c.data.dataset, "tasks": {k: v for k, v in dict(c.tasks.ratios).items() if v},
               "stages": [{k: s[k] for k in ("stage", "steps", "best_step", f"valid_{METRIC}", "stopped", "wall_s")}
                          for s in summaries],
               # The last stage validated the model it leaves (its best step) on these users: no second pass.
               "valid": scored_metrics(r, r.model, valid) if best is None else {SCORED: best, "count": len(valid)}}
    if r.soft:
      keep = ("steps", "best_step", "stopped", "wall_s", "valid_NDCG@10")
      summary["unified"] = {"encoder": {k: encoder.get(k) for k in keep}, "curriculum": bool(c.unified.curriculum),
                            "loss_weights": {k: v for k, v in dict(c.unified.loss_weights).items() if v}}
    if c.data.test_size != 0:
      t1 = time.time()
      summary["test"] = evaluate_split(r, "test", workdir, c.data.test_size)
      summary["test_s"] = time.time() - t1
    return summary | {"wall_s": time.time() - t0}

  return trainer.run_once(config, workdir, SUMMARY, build_run, finish, log)


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run lines: the stage, then valid and test metrics beside popularity on the same candidates."""
  if summary.get("preempted"):
    return f"preempted at step {summary['steps']} of {summary['stage']}: run the same command again to continue"
  lines = [f"{'dataset':<22}{summary['dataset']} (tasks " + ", ".join(f"{k} {v:g}" for k, v in
                                                                     summary["tasks"].items()) + ")"]
  for s in summary["stages"]:
    lines.append(f"{'stage ' + s['stage']:<22}{s['steps']} steps, best {s['best_step']} (valid {METRIC} "
                 f"{s[f'valid_{METRIC}']:.4f}), stopped by {s['stopped']}, {s['wall_s'] / 60:.1f} min")
  if "unified" in summary:
    u, e = summary["unified"], summary["unified"]["encoder"]
    ndcg = float("nan") if e["valid_NDCG@10"] is None else e["valid_NDCG@10"]
    lines.append(f"{'ID encoder':<22}{e['steps']} steps (best {e['best_step']}, valid NDCG@10 {ndcg:.4f}), "
                 f"stopped by {e['stopped']}")
    lines.append(f"{'unified prompts':<22}losses " + ", ".join(f"{k} {v:g}" for k, v in u["loss_weights"].items())
                 + (", curriculum" if u["curriculum"] else ""))
  if not summary["stages"]:
    lines.append(f"{'stages':<22}none: the model as loaded (zero-shot)")
  v = summary["valid"]
  lines.append(f"{'valid':<22}{SCORED} {v[SCORED]:.4f}  ({v['count']} users)")
  if "test" in summary:
    t = summary["test"]
    gen = f"  {HIT} {t[HIT]:.4f}  {VALID} {t[VALID]:.4f}" if HIT in t else ""
    lines.append(f"{'test':<22}{SCORED} {t[SCORED]:.4f}{gen}  ({t['count']} users)")
    lines.append(f"{'test, popularity':<22}{SCORED} {t['popularity'][SCORED]:.4f}")
  return "\n".join(lines)
