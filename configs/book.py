"""CLCLMRec on TALLRec book (Book-Crossing), 64-shot, by residual fusion: the main job (`make run`). The pretrained
behaviour encoder's like-logit plus what LoRA changes in the LLM's Yes-minus-No logit on the text-only prompt
(configs/movie.py's switch, `residual_overrides`, on configs/book_soft_tokens.py). Stage 2 alone, validated at step 0
(the encoder) and every `train.eval_every` steps, keeping the best step only if it also beats the encoder on the
whole validation split. TALLRec-style LoRA alone: configs/tallrec_book.py.

  python train.py --config=configs/book.py
"""

from ml_collections import ConfigDict

from configs import book_soft_tokens
from configs.movie import residual_overrides


def get_config() -> ConfigDict:
  c = residual_overrides(book_soft_tokens.get_config())
  c.name = "book"
  # 32 steps validated at 0, 8, 16, 24 and 32; 2 validations without a better AUC stop the stage early.
  c.train.eval_every, c.train.patience = 8, 2
  return c
