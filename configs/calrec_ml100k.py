"""CALRec on MovieLens-100K: SmolLM2-135M-Instruct (int8 base, LoRA) fine-tuned on next-item text, first on the
MovieLens-100K + Beauty mixture, then on MovieLens-100K alone; dense and generation+BM25 evaluation
(clclm_jax/seqrec/calrec.py). Step counts and batch sizes are first guesses, not tuned: no SmolLM2 run of this
config has been measured yet."""

from ml_collections import ConfigDict

from configs import base


def calrec_overrides(c: ConfigDict) -> ConfigDict:
  """The fields every CALRec config shares, on top of `configs/base.py` (its TALLRec data, stage list, loss
  weights, instruction data and epoch counts are not read by CALRec and go)."""
  with c.unlocked():
    del c.stages, c.loss_weights, c.instruct, c.data, c.train.num_epochs, c.train.max_steps
    c.data = ConfigDict(dict(
        dataset="ml100k",  # the target domain: stage II, validation, test
        mixture=("ml100k", "beauty"),  # stage I's domains (single-domain batches, interleaved)
        max_users=0,  # > 0: the training examples of that many seeded users per dataset (quick runs)
        max_history=20,  # the most recent items of a history that a prompt shows ...
        max_prompt_tokens=512,  # ... as far as they fit this many tokens (oldest dropped first)
        max_item_tokens=32,  # an item line is cut here (a few Beauty titles run to 200 tokens)
        pad_multiple=64,  # row widths: few distinct shapes, few compiles of the 30-layer model
        valid_size=256,  # seeded validation users for the stages' dense NDCG@10 (model selection)
        test_size=-1,  # seeded test users (-1: all, 0: no test); Beauty: 2,000, the baselines' subset
        subset_seed=0,  # the seed of those subsets: seqrec.baselines.sample_examples' default, the same users
    ))
    c.calrec = ConfigDict(dict(
        finetune="lora",  # or "full": every float weight (set model.quantize='' and model.dtype='float32')
        temperature=0.1,  # of the cosine InfoNCE terms
        # False: each InfoNCE anchor's negatives are the other tower's vectors only. SmolLM2's mean-pooled prompts
        # share their template (cosine ~0.98 between users, ~0.93 user to target), so same-tower negatives outrank
        # every positive and hold the loss at chance.
        same_tower_negatives=True,
        # v_U: "mean" of the prompt's states (shared template and all), or "cue": the state after the prompt and
        # the `Title:` every item line opens with, which next-item generation trains to predict the target's title.
        user_pooling="mean",
        # CALRec's total (1 - a - b) L_NIG + a L_TT + b L_UT; the paper's a, b are unverified. 0 switches a term off
        # (the ablations without L_TT or L_UT); both InfoNCE terms at 0 also skip the item-tower pass.
        loss_weights=ConfigDict({"calrec_nig": 0.8, "calrec_tt": 0.1, "calrec_ut": 0.1}),
        # Stage I (steps 0: the ablation without the multi-domain stage); max_prefixes: training prefixes per user
        # (0: all), few here so that Beauty's 22k users do not crowd out MovieLens' 943 too far.
        mixture=ConfigDict(dict(steps=200, max_prefixes=2)),
        target=ConfigDict(dict(steps=200, max_prefixes=8)),  # stage II on data.dataset
    ))
    c.eval = ConfigDict(dict(
        dense=True,  # cosine(v_U, v_T) over the catalogue
        generation=True,  # generated item lines -> BM25 -> round-robin merge (slow on CPU: one decode per user)
        num_samples=4, temperature=0.7, top_p=0.9,  # sampled continuations per user (temperature 0: greedy, 1)
        num_beams=1,  # > 1: beam search instead, the num_samples best beams (temperature 0)
        # Keep history items in every ranking, as the ID baselines' headline does (configs/pretrain_beauty.py).
        exclude_history=False,
    ))
  c.optim.lr, c.optim.warmup_steps = 2e-4, 20
  c.train.batch_size, c.train.micro_batch_size = 8, 8  # in-batch negatives: the 7 other rows of a batch
  c.train.eval_every, c.train.patience, c.train.checkpoint_every = 50, 4, 25
  c.train.eval_batch_size = 16  # rows per tower / generation call in validation and test
  return c


def with_tasks(c: ConfigDict, ratios: dict[str, float]) -> ConfigDict:
  """Cao et al.'s auxiliary-task prompts mixed into both stages' batches (data/auxtasks.py), the `tasks` block of
  configs/cand_ml100k.py: each training row's task drawn by `ratios` ("rec": CALRec's own next-item row)."""
  with c.unlocked():
    c.tasks = ConfigDict(dict(
        ratios=ConfigDict({"rec": 0.0, "mim": 0.0, "bpr": 0.0, "mlm": 0.0, **ratios}),
        mim_max_masks=2,  # masked item modelling hides 1..this many items
        mlm_max_words=12,  # masked language modelling reads a title's first words ...
        mlm_mask_rate=0.3,  # ... and hides this share of them (at least one)
    ))
  return c


def variant(c: ConfigDict, name: str, path: str) -> ConfigDict:
  """`<path>:aux`: every auxiliary task beside CALRec's rows (cand_beauty's ratios). Their prompts are never cut,
  so max_prompt_tokens rises to hold 20 items at their 32-token cut (SmolLM2: BPR's bound is 752 tokens); compare
  with the plain config at the same max_prompt_tokens (it also lets the rec prompts keep more of a long history)."""
  if name not in ("", "aux"):
    raise ValueError(f"{path}:{name}: use no variant or 'aux'")
  if name == "aux":
    c = with_tasks(c, {"rec": 1.0, "mim": 0.2, "bpr": 0.2, "mlm": 0.2})
    c.name += "_aux"
    c.data.max_prompt_tokens = 768
  return c


def get_config(name: str = "") -> ConfigDict:
  """`configs/calrec_ml100k.py:aux`: with the auxiliary tasks (`variant`)."""
  c = calrec_overrides(base.get_config())
  c.name = "calrec_ml100k"
  return variant(c, name, "configs/calrec_ml100k.py")
