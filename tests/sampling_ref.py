"""An independent numpy reference of the sampling law, shared by the sampler and engine tests."""

import numpy as np


def exact_filtered_probs(logits, temperature, top_k, top_p, banned):
  """Independent numpy reference: temperature, top-k, top-p (smallest set with mass >= p), renormalise."""
  x = logits.astype(np.float64) / temperature
  x[list(banned)] = -np.inf
  order = np.argsort(-x, kind="stable")
  keep = np.zeros(len(x), bool)
  k = len(x) if top_k <= 0 else top_k
  keep[order[:k]] = True
  p = np.where(keep, np.exp(x - x.max()), 0.0)
  p /= p.sum()
  cum = np.cumsum(p[order])
  n_keep = int(np.searchsorted(cum, top_p - 1e-12) + 1) if top_p < 1 else len(x)
  keep2 = np.zeros(len(x), bool)
  keep2[order[:n_keep]] = True
  p = np.where(keep2, p, 0.0)
  return p / p.sum()
