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
    c.candidates = ConfigDict(dict(steps=300))  # LoRA updates (0: the zero-shot model); unified: stage 1's
    # Unified prompts (RSLLM / LLaRA, seqrec/unified.py): one soft token after each item title (history and
    # candidates), the item's embedding from the pretrained ID encoder (frozen) through a trained projector.
    # Stage 1 trains LoRA on text-only prompts (candidates.steps), stage 2 LoRA + projector on unified prompts.
    c.unified = ConfigDict(dict(
        enabled=False,
        placeholder="<reponame>",  # a SmolLM2 special token no title holds: each soft token's slot
        encoder_config="pretrain_ml100k",  # configs/<this>.py pretrains the ID encoder (SASRec, CL4SRec losses) ...
        encoder_overrides=ConfigDict({}),  # ... with these of its fields changed ...
        encoder_workdir="",  # ... in this folder ("": WORKDIR/encoder); a finished pretraining there is reused
        projector_hidden=256,  # Linear(encoder width, this), GELU, Linear(this, LLM width)
        # Stage 1's folder ("": WORKDIR/text; a text-only run trains in WORKDIR). Runs whose text-only training is
        # the same (a text-only run, the unified runs and their stage-2 ablations) may name one folder: a finished
        # stage there is restored, not trained again.
        text_workdir="",
        steps=300,  # stage 2 updates
        curriculum=True,  # LLaRA: the share of unified prompts in a batch rises linearly from 0 to 1 over stage 2
        # 0 = off. answer_lm: the answer's CE; user_cl: InfoNCE of the LLM's pooled history state and the encoder's
        # user representation; item_cl: InfoNCE of an item title's pooled LLM states and its projected ID embedding.
        loss_weights=ConfigDict({"answer_lm": 1.0, "user_cl": 0.1, "item_cl": 0.1}),
        user_temperature=0.1,  # InfoNCE temperatures (cosine similarity)
        item_temperature=0.1,
        # False: CLIP's loss, the other side's items or users are the negatives (the usual cross-modal InfoNCE;
        # chance ln N at the start). True: NT-Xent, same-side pairs too; the LLM's pooled states start nearly
        # parallel (cosine ~0.95-0.99 between users or titles), so those negatives outscore every positive and both
        # terms start far above chance (measured at 30 steps: user_cl ~10, item_cl ~10.5 against ln(2N - 1) = 3.4),
        # and their gradient spends itself pushing users apart from each other.
        same_side_negatives=False,
    ))
    c.eval = ConfigDict(dict(
        generation=True,  # generated answers on test (one decode per user) ...
        temperature=0.0,  # ... greedy (0), or one sample from softmax(logits / this) (seed: config.seed) ...
        top_p=1.0,  # ... within its nucleus of this probability (1: every token) ...
        num_beams=1,  # ... or the best of beam search with this many beams (> 1, temperature 0)
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
