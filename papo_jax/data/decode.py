"""Sampled token ids back to text (the reward's input)."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def decode_responses(tokenizer, tokens_RxT: np.ndarray, mask_RxT: np.ndarray, stop_ids: Iterable[int]) -> list[str]:
  """One string per row: the tokens under the mask, stop tokens dropped, special tokens kept.

  Special tokens stay in the text (``skip_special_tokens=False``) so a response that
  writes ``<|im_start|>`` or similar is graded as written.
  """
  stop = {int(t) for t in stop_ids}
  out = []
  for toks, m in zip(tokens_RxT, mask_RxT):
    kept = [int(t) for t, k in zip(toks, m) if k and int(t) not in stop]
    out.append(tokenizer.decode(kept, skip_special_tokens=False))
  return out
