"""Residual fusion on TALLRec book (issue 51): configs/movie_residual.py's switch on configs/book.py. The encoder's
like-logit plus what LoRA changes in the LLM's Yes-minus-No logit on the text-only prompt; stage 2 alone, validated
at step 0 (the encoder) and every `train.eval_every` steps, keeping the best if it also beats the encoder on the
whole validation split.

  python train.py --config=configs/book_residual.py
"""

from ml_collections import ConfigDict

from configs import book
from configs.movie_residual import residual_overrides


def get_config() -> ConfigDict:
  c = residual_overrides(book.get_config())
  c.name = "book_residual"
  # 32 steps validated at 0, 8, 16, 24 and 32; 2 validations without a better AUC stop the stage early.
  c.train.eval_every, c.train.patience = 8, 2
  return c
