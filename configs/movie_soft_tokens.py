"""CLCLMRec's soft-token fusion on TALLRec movie (MovieLens-100K), 16-shot: encoder pretraining on behaviour
sequences, stage 1 text-only LoRA, stage 2 fused soft tokens + contrastive losses. The project's earlier recipe:
on the whole test sets it scores below its own encoder (docs/results.md), so configs/movie.py switches it to
residual fusion. TALLRec-style LoRA alone: configs/tallrec_movie.py.

  python train.py --config=configs/movie_soft_tokens.py
"""

from ml_collections import ConfigDict

from configs import base

# Aligns the LLM's view of the history with the encoder's; a small but paired-significant gain over plain
# fusion on movie (benchmarks/fused_quality.py, docs in benchmarks/README.md).
ALIGN_CL_WEIGHT = 0.1


def fused_overrides(c: ConfigDict) -> ConfigDict:
  """The recipe fields shared by the movie and book configs, added on top of `configs/base.py`."""
  c.data.train_on_inputs = False  # LM loss on the answer only
  c.data.pad_multiple = 64  # few padded widths: each new one compiles the 30-layer step again (~100 s)
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.train.batch_size = 8
  c.train.micro_batch_size = 8
  # Stage 2 is validated once, after its last step: few-shot validation subsets are too small to pick a step by.
  c.train.eval_every = 0
  with c.unlocked():
    # The recipe's stages are its own (encoder pretraining, stage1, stage2 below): TALLRec's stage list, loss
    # weights, instruction data and epoch-based lengths do nothing here.
    del c.stages, c.loss_weights, c.instruct, c.train.num_epochs, c.train.max_steps
    c.fusion = ConfigDict(dict(
        num_soft_tokens=4, placeholder="<reponame>",  # a SmolLM2 special token that TALLRec text never holds
        source="user", projector_hidden=256, encoder_hidden=64, encoder_layers=2, encoder_heads=2,
        encoder_dropout=0.2, pooling="mean", history_len=10, view_len=128, corr_top_k=1,
        seq_temperature=0.2, text_temperature=0.1, align_temperature=0.1,
        # "titles": the encoder's item table is the LLM's embedding of each item's text (frozen, projected),
        # not learned ids (fusion.item_text_table; ~1 min for movie's 1,682 items, ~15 min for book's 25k on CPU).
        item_init="",
        # The encoder reads the target item and is pretrained on behaviour sequences (contrastive/feedback.py):
        # next-feedback BCE + cl_weight x InfoNCE over augmented views; epochs=0 leaves it untrained.
        target_aware=True, answer_hint=True,  # first soft token: P(like) x E[Yes] + (1 - P(like)) x E[No]
        hint_scale=1.0,  # P(like) = sigmoid(hint_scale x the feedback head's logit)
        prompt_dropout=True,  # encoder dropout also when it fills the soft tokens in training
        # "residual": the answer logit is the encoder's like-logit + (Yes-minus-No logit of the LLM with LoRA -
        # the same with LoRA off), trained by the residual_answer loss; stage 1 off, so it starts as its encoder.
        # residual_gate: learned scalar weights on both parts; residual_soft_tokens: the prompt keeps the soft
        # tokens (else the text-only prompt).
        # residual_confirm_size: validation prompts (-1: all) on which the best step must beat the encoder alone
        # (paired-bootstrap 95% interval above zero) to be kept over it; 0: the best validated step stands.
        mode="soft_tokens", residual_gate=False, residual_soft_tokens=False, residual_confirm_size=0,
        pretrain=ConfigDict(dict(epochs=12, batch_size=256, lr=1e-3, stride=5, cl_weight=0.1, patience=3,
                                 item_mask_rate=0.0, shuffle_order=False))))
    # Two stages as in the seeds: text-only prompts, then prompts with the fused tokens.
    # history_targets: masked-item prompts per few-shot prompt, a history item as the target and its like
    # as the label (data/fewshot.py; the auxiliary-task idea); 0: off.
    c.stage1 = ConfigDict(dict(steps=16, history_targets=0, loss_weights=ConfigDict({"text_lm": 1.0})))
    c.stage2 = ConfigDict(dict(steps=16, history_targets=0, loss_weights=ConfigDict(
        {"fused_lm": 1.0, "seq_cl": 0.1, "text_cl": 0.1, "align_cl": 0.0, "hint_kd": 0.0,
         "residual_answer": 0.0})))  # weight 0: off
  return c


def get_config() -> ConfigDict:
  c = fused_overrides(base.get_config())
  c.name = "movie_soft_tokens"
  c.data.domain = "movie"
  c.data.shots = 16
  # Few-shot stages are short: 16 examples are 2 batches, and more steps over-fit them (benchmarks/fused_quality.py).
  c.stage1.steps = c.stage2.steps = 8
  c.stage2.loss_weights.align_cl = ALIGN_CL_WEIGHT
  return c
