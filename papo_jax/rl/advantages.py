"""GRPO/DAPO advantages and DAPO dynamic sampling (papo.md section 4). Host-side NumPy."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

ADV_EPS = 1e-6
DAPO_ACC_LOW = 0.01
DAPO_ACC_HIGH = 0.99
DAPO_MAX_ROUNDS = 20


def group_advantages(rewards_B: np.ndarray, group_ids_B: np.ndarray | None = None, *,
                     group_size: int | None = None, eps: float = ADV_EPS) -> np.ndarray:
  """[B] float32 (r - group mean) / (unbiased group std + eps); 0 for groups of size 1.

  Groups come from `group_ids_B` (any hashable ids, any order) or, when it is None, from
  consecutive runs of `group_size` responses (rewards reshaped to [B / n, n]).
  """
  r_B = np.asarray(rewards_B, np.float64)
  if r_B.ndim != 1:
    raise ValueError(f'group_advantages: rewards must be [B], got shape {r_B.shape}')
  if group_ids_B is None:
    if not group_size or r_B.shape[0] % group_size:
      raise ValueError(f'group_advantages: {r_B.shape[0]} rewards do not split into groups '
                       f'of group_size={group_size}')
    return grpo_advantages_GxN(r_B.reshape(-1, group_size), eps=eps).reshape(-1)
  ids_B = np.asarray(group_ids_B)
  if ids_B.shape != r_B.shape:
    raise ValueError(f'group_advantages: group ids shape {ids_B.shape} != rewards shape {r_B.shape}')
  _, inv_B, count_G = np.unique(ids_B, return_inverse=True, return_counts=True)
  inv_B = inv_B.reshape(-1)
  mean_G = np.bincount(inv_B, weights=r_B) / count_G
  sq_G = np.bincount(inv_B, weights=(r_B - mean_G[inv_B])**2)
  std_G = np.sqrt(sq_G / np.maximum(count_G - 1, 1))  # ddof=1; size-1 groups: 0/1 -> 0
  adv_B = (r_B - mean_G[inv_B]) / (std_G[inv_B] + eps)
  return adv_B.astype(np.float32)


def grpo_advantages_GxN(rewards_GxN: np.ndarray, *, eps: float = ADV_EPS) -> np.ndarray:
  """[G, N] float32 per-row (r - mean) / (unbiased std + eps); rows with N == 1 give 0."""
  r_GxN = np.asarray(rewards_GxN, np.float64)
  if r_GxN.ndim != 2:
    raise ValueError(f'grpo_advantages_GxN: rewards must be [G, N], got shape {r_GxN.shape}')
  n = r_GxN.shape[1]
  mean_Gx1 = r_GxN.mean(axis=1, keepdims=True)
  std_Gx1 = r_GxN.std(axis=1, ddof=1, keepdims=True) if n > 1 else np.zeros_like(mean_Gx1)
  return ((r_GxN - mean_Gx1) / (std_Gx1 + eps)).astype(np.float32)


def broadcast_to_tokens(adv_B, response_mask_BxT):
  """[B] advantages -> [B, T] on response tokens, 0 elsewhere (NumPy or jax arrays)."""
  return adv_B[:, None] * response_mask_BxT


# ----------------------------------------------------------------------------------
# DAPO dynamic sampling.
# ----------------------------------------------------------------------------------


def keep_groups(acc_GxN: np.ndarray, low: float = DAPO_ACC_LOW,
                high: float = DAPO_ACC_HIGH) -> np.ndarray:
  """[G] bool: low < mean accuracy of the group < high (strict), DAPO's filter."""
  acc_GxN = np.asarray(acc_GxN, np.float64)
  if acc_GxN.ndim != 2:
    raise ValueError(f'keep_groups: accuracies must be [G, N], got shape {acc_GxN.shape}')
  mean_G = acc_GxN.mean(axis=1)
  return (mean_G > low) & (mean_G < high)


def _num_groups(chunk: Any) -> int:
  if isinstance(chunk, Mapping):
    sizes = {k: np.shape(v)[0] for k, v in chunk.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f'DynamicSampler: arrays disagree on the number of groups: {sizes}')
    return next(iter(sizes.values()), 0)
  return len(chunk)


def _select(chunk: Any, idx: np.ndarray) -> Any:
  if isinstance(chunk, Mapping):
    return {k: np.asarray(v)[idx] for k, v in chunk.items()}
  return [chunk[i] for i in idx]


def _concat(parts: Sequence[Any]) -> Any:
  if isinstance(parts[0], Mapping):
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
  return [g for p in parts for g in p]


class DynamicSampler:
  """Accumulates the groups that pass DAPO's filter over generation rounds.

  The trainer loops `while not sampler.done:` generating a chunk of prompts, then calls
  `add(chunk, keep_G)`. A chunk is either a mapping of arrays whose leading axis is the
  group axis ([G, ...]) or a sequence of per-group objects. `result()` returns exactly
  `target_groups` groups: the kept ones when enough survived; after `max_rounds`, the kept
  ones topped up with filtered groups in the order they came (with a warning). A filtered
  group's rewards are all equal, so its advantages are 0 and it adds no policy gradient;
  the update keeps its static shape (rows = target_groups x n). Fewer come back only when
  fewer than `target_groups` were generated in all (the trainer's config check rules that out).
  """

  def __init__(self, target_groups: int, max_rounds: int = DAPO_MAX_ROUNDS):
    if target_groups < 1 or max_rounds < 1:
      raise ValueError(f'DynamicSampler: target_groups={target_groups} and '
                       f'max_rounds={max_rounds} must be >= 1')
    self.target_groups = target_groups
    self.max_rounds = max_rounds
    self.rounds = 0
    self.groups_seen = 0
    self.groups_kept = 0
    self._kept: list[Any] = []
    self._dropped: list[Any] = []   # filtered groups, only as many as a top-up can need
    self._dropped_count = 0

  @property
  def done(self) -> bool:
    """True once target_groups survived or max_rounds chunks were added."""
    return self.groups_kept >= self.target_groups or self.rounds >= self.max_rounds

  def add(self, chunk: Any, keep_G: np.ndarray) -> None:
    """Adds one generated chunk of G groups and its [G] keep mask."""
    if self.done:
      raise RuntimeError(f'DynamicSampler.add after done (rounds={self.rounds}, '
                         f'kept={self.groups_kept}/{self.target_groups})')
    keep_G = np.asarray(keep_G, bool)
    g = _num_groups(chunk)
    if keep_G.shape != (g,):
      raise ValueError(f'DynamicSampler.add: keep mask shape {keep_G.shape} for {g} groups')
    self.rounds += 1
    self.groups_seen += g
    idx = np.flatnonzero(keep_G)
    if idx.size:
      self._kept.append(_select(chunk, idx))
      self.groups_kept += int(idx.size)
    else:
      logging.info('DAPO round %d: none of %d groups kept', self.rounds, g)
    dropped = np.flatnonzero(~keep_G)[:max(self.target_groups - self._dropped_count, 0)]
    if dropped.size:
      self._dropped.append(_select(chunk, dropped))
      self._dropped_count += int(dropped.size)

  @property
  def fallback(self) -> bool:
    """True when result() tops the kept groups up with filtered ones."""
    return self.groups_kept < self.target_groups

  @property
  def padded_groups(self) -> int:
    """How many filtered groups result() adds."""
    return min(max(self.target_groups - self.groups_kept, 0), self._dropped_count)

  def result(self) -> Any:
    """Exactly target_groups groups (see the class docstring)."""
    if self.rounds == 0:
      raise RuntimeError('DynamicSampler.result before any add()')
    if not self.done:
      raise RuntimeError(f'DynamicSampler.result before done: {self.groups_kept}/'
                         f'{self.target_groups} groups after {self.rounds} rounds')
    if not self.fallback:
      return _select(_concat(self._kept), np.arange(self.target_groups))
    logging.warning('DAPO: only %d/%d groups survived %d rounds; %d filtered groups (zero advantage) '
                    'fill the batch', self.groups_kept, self.target_groups, self.rounds, self.padded_groups)
    merged = _concat(self._kept + self._dropped)
    return _select(merged, np.arange(min(_num_groups(merged), self.target_groups)))

  def metrics(self) -> dict[str, float]:
    """Counts for logging (names under dapo/)."""
    return {
        'dapo/rounds': float(self.rounds),
        'dapo/groups_seen': float(self.groups_seen),
        'dapo/groups_kept': float(self.groups_kept),
        'dapo/keep_frac': self.groups_kept / max(self.groups_seen, 1),
        'dapo/fallback': float(self.fallback),
        'dapo/padded_groups': float(self.padded_groups),
    }
