"""CLCLMRec on TALLRec movie (MovieLens-100K), 16-shot, by residual fusion: the pretrained behaviour encoder's
like-logit plus what LoRA changes in the LLM's Yes-minus-No logit on the text-only prompt (contrastive/fusion.py,
`FusedRec.residual_logit`). The encoder is pretrained on behaviour sequences; no stage 1, so LoRA starts at zero and
the model at its encoder; stage 2 trains LoRA by the residual answer loss alone and is validated before its first
step and every `train.eval_every` steps, keeping the best step only if it also beats the encoder on the whole
validation split: otherwise the run ends as its encoder, so the LLM never costs AUC. The soft-token recipe this
switches from: configs/movie_soft_tokens.py. TALLRec-style LoRA alone: configs/tallrec_movie.py.

  python train.py --config=configs/movie.py
"""

from ml_collections import ConfigDict

from configs import movie_soft_tokens


def residual_overrides(c: ConfigDict) -> ConfigDict:
  """Switches a soft-token recipe config (configs/movie_soft_tokens.py, book_soft_tokens.py) to residual fusion on
  text-only prompts, as the `residual` variant of benchmarks/fused_quality.py trains it."""
  c.fusion.mode = "residual"
  # A step chosen on the 128-prompt validation subset is kept only if it also beats the encoder on the whole
  # validation split (paired interval above zero): on 128 prompts an AUC's standard error is ~4 points.
  c.fusion.residual_confirm_size = -1
  c.stage1.steps = 0  # LoRA at zero: step 0 is the encoder (runconfig.validate requires it)
  with c.unlocked():  # no stage 1 ever runs in residual fusion: its losses and extra prompts would do nothing
    del c.stage1.loss_weights, c.stage1.history_targets
  # The residual answer loss alone: the encoder is frozen (seq_cl would train nothing), fused_lm and hint_kd train a
  # soft-token answer this model does not give, and the text and alignment terms are not what was measured.
  c.stage2.loss_weights.update(residual_answer=1.0, fused_lm=0.0, hint_kd=0.0, seq_cl=0.0, text_cl=0.0, align_cl=0.0)
  return c


def get_config() -> ConfigDict:
  c = residual_overrides(movie_soft_tokens.get_config())
  c.name = "movie"
  # 8 steps validated at 0, 2, 4, 6 and 8 (the first check is the encoder alone); 2 validations without a better
  # AUC stop the stage, the best step's parameters are the result.
  c.train.eval_every, c.train.patience = 2, 2
  return c
