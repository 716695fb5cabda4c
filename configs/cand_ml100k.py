"""LLaRA's candidate ranking task on MovieLens-100K: SmolLM2-135M-Instruct (int8 base, LoRA) fine-tuned on
text-only prompts (history titles, 20 candidates, name the next one), optionally mixed with Cao et al.'s
auxiliary-task prompts; decoding-free and generated HitRatio@1, ValidRatio (clclm_jax/seqrec/candidates.py).
Step counts are first guesses, not tuned: no trained SmolLM2 run of this config has been measured yet."""

from ml_collections import ConfigDict

from configs import base


def candidate_overrides(c: ConfigDict) -> ConfigDict:
  """The fields every candidate-task config shares, on top of `configs/base.py` (its TALLRec data, stage list,
  loss weights, instruction data and epoch counts are not read here and go)."""
  with c.unlocked():
    del c.stages, c.loss_weights, c.instruct, c.data, c.train.num_epochs, c.train.max_steps
    c.data = ConfigDict(dict(
        dataset="ml100k",
        max_users=0,  # > 0: the training examples of that many seeded users (quick runs)
        max_prefixes=8,  # training prefixes per user (0: all), seeded
        max_history=10,  # the most recent history items a prompt shows (LLaRA: 10)
        num_candidates=20,  # the target and 19 items the user never interacted with (LLaRA: 20)
        max_item_tokens=24,  # a title is cut here (MovieLens: 99% of titles are shorter)
        max_prompt_tokens=1024,  # must hold the longest prompt (checked): 30 titles at their cut and the template
        pad_multiple=64,  # row widths: few distinct shapes, few compiles
        valid_size=200,  # seeded validation users for the stage's decoding-free HitRatio@1 (model selection)
        test_size=-1,  # seeded test users (-1: all, 0: no test)
        subset_seed=0,  # the seed of those subsets (seqrec.baselines.sample_examples): the same users for all
        candidate_seed=0,  # the seed of the validation / test candidates: the same candidates for every run
    ))
    c.tasks = ConfigDict(dict(
        # Each training row's task is drawn by these ratios (data/auxtasks.py): rec, mim, bpr, mlm.
        ratios=ConfigDict({"rec": 1.0, "mim": 0.0, "bpr": 0.0, "mlm": 0.0}),
        mim_max_masks=2,  # masked item modelling hides 1..this many items
        mlm_max_words=12,  # masked language modelling reads a title's first words ...
        mlm_mask_rate=0.3,  # ... and hides this share of them (at least one)
    ))
    c.candidates = ConfigDict(dict(steps=300))  # LoRA updates (0: the zero-shot model)
    c.eval = ConfigDict(dict(
        generation=True,  # generated answers on test (one greedy decode per user)
        # Decoding-free scores: the answer's mean token log-likelihood instead of its sum (the sum is lower for
        # longer titles). Zero-shot SmolLM2 on 100 MovieLens test users: HitRatio@1 0.03 (sum), 0.05 (mean), chance
        # 0.05, popularity 0.21: the untrained model does not rank candidates.
        per_token=False,
    ))
  c.optim.lr, c.optim.warmup_steps = 2e-4, 20  # LLaRA's lr
  c.train.batch_size, c.train.micro_batch_size = 16, 4
  c.train.eval_every, c.train.patience, c.train.checkpoint_every = 50, 4, 25
  c.train.eval_batch_size = 4  # users per scoring call (x 20 candidate rows) and prompts per generation call
  return c


def get_config() -> ConfigDict:
  c = candidate_overrides(base.get_config())
  c.name = "cand_ml100k"
  return c
