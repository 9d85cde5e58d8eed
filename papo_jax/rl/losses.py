"""PAPO loss (papo.md section 2): PPO dual-clip + ref KL - gamma * perception KL + entropies.

Pure functions of arrays and config scalars returning `(loss, metrics)`; no model inside.
All arithmetic is float32 whatever the input dtype. Shapes: B sequences, T response
tokens; `mask_BxT` is 1 on response tokens up to and including EOS.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

LOG_RATIO_CLIP = 20.0  # |lp - lp_old| and |lp_other - lp| are clipped to this
K3_CLIP = 10.0  # k3 is clipped to [-K3_CLIP, K3_CLIP]
AGG_EPS = 1e-8
AGG_MODES = ('token', 'seq_mean_token_mean')

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss configuration (hashable: pass as a static jit argument).

  beta: reference-KL coefficient; gamma: perception-KL coefficient (subtracted, i.e. the
  KL is maximised); eta_ori / eta_mask: coefficients of tokmean(-lp) / tokmean(-lp_mask).
  kl_prcp_clamp: (lo, hi) per-token clamp of the perception KL, e.g. (0.0, 0.2).
  kl_prcp_top_frac: keep only this fraction of each sequence's tokens, by perception KL.
  """
  eps_low: float = 0.2
  eps_high: float = 0.3
  dual_clip: float = 3.0
  beta: float = 0.0
  gamma: float = 0.0
  eta_ori: float = 0.0
  eta_mask: float = 0.0
  agg: str = 'token'
  kl_prcp_clamp: tuple[float, float] | None = None
  kl_prcp_top_frac: float | None = None

  def __post_init__(self):
    if not 0.0 <= self.eps_low < 1.0 or self.eps_high < 0.0:
      raise ValueError(f'LossConfig eps_low={self.eps_low}, eps_high={self.eps_high}: need '
                       '0 <= eps_low < 1 and eps_high >= 0')
    if self.dual_clip <= 1.0:
      raise ValueError(f'LossConfig dual_clip={self.dual_clip}: must be > 1')
    if self.agg not in AGG_MODES:
      raise ValueError(f'LossConfig agg={self.agg!r}: expected one of {AGG_MODES}')
    if self.kl_prcp_clamp is not None:
      clamp = tuple(float(v) for v in self.kl_prcp_clamp)
      if len(clamp) != 2 or clamp[0] > clamp[1]:
        raise ValueError(f'LossConfig kl_prcp_clamp={self.kl_prcp_clamp}: expected (lo, hi), lo <= hi')
      object.__setattr__(self, 'kl_prcp_clamp', clamp)  # lists from configs -> hashable tuple
    if self.kl_prcp_top_frac is not None and not 0.0 < self.kl_prcp_top_frac <= 1.0:
      raise ValueError(f'LossConfig kl_prcp_top_frac={self.kl_prcp_top_frac}: must be in (0, 1]')


# ----------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------


def agg_tokens(x_BxT: Array, mask_BxT: Array, mode: str = 'token') -> Array:
  """Scalar: 'token' = sum(x*m)/(sum(m)+1e-8); 'seq_mean_token_mean' = mean over sequences."""
  x_BxT = jnp.asarray(x_BxT, jnp.float32)
  m_BxT = jnp.asarray(mask_BxT, jnp.float32)
  if mode == 'token':
    # = sum(x*m) / (sum(m) + eps); scaling first and summing rows then rows' sums keeps the
    # float32 rounding error ~5x below one flat sum (measured against float64).
    w_BxT = m_BxT / (jnp.sum(m_BxT) + AGG_EPS)
    return jnp.sum(jnp.sum(x_BxT * w_BxT, axis=-1))
  if mode == 'seq_mean_token_mean':
    n_B = jnp.sum(m_BxT, axis=-1)
    seq_B = jnp.sum(x_BxT * m_BxT, axis=-1) / (n_B + AGG_EPS)
    has_B = (n_B > 0).astype(jnp.float32)  # sequences without tokens do not count
    return jnp.sum(seq_B * has_B) / (jnp.sum(has_B) + AGG_EPS)
  raise ValueError(f'aggregation mode {mode!r}: expected one of {AGG_MODES}')


def k3(lp_BxT: Array, lp_other_BxT: Array) -> Array:
  """[B, T] Schulman's k3 estimate of KL(pi || pi_other), float32, clipped to [-10, 10]."""
  x = jnp.clip(jnp.asarray(lp_other_BxT, jnp.float32) - jnp.asarray(lp_BxT, jnp.float32),
               -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
  return jnp.clip(jnp.exp(x) - x - 1.0, -K3_CLIP, K3_CLIP)


def ppo_dual_clip(lp_BxT: Array, old_lp_BxT: Array, adv_BxT: Array, eps_low: float,
                  eps_high: float, dual_clip: float) -> tuple[Array, dict[str, Array]]:
  """[B, T] PPO clipped surrogate with asymmetric clip and dual clip, plus [B, T] clip flags."""
  lp = jnp.asarray(lp_BxT, jnp.float32)
  adv = jnp.asarray(adv_BxT, jnp.float32)
  d = jnp.clip(lp - jnp.asarray(old_lp_BxT, jnp.float32), -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
  ratio = jnp.exp(d)
  cratio = jnp.exp(jnp.clip(d, math.log(1.0 - eps_low), math.log(1.0 + eps_high)))
  pg = jnp.maximum(-adv * ratio, -adv * cratio)
  neg = adv < 0
  dual_bound = -adv * dual_clip
  pg_out = jnp.where(neg, jnp.minimum(pg, dual_bound), pg)
  flags = {
      # The clip binds (gradient cut): high side for A > 0, low side for A < 0.
      'clip_high': (adv > 0) & (ratio > 1.0 + eps_high),
      'clip_low': neg & (ratio < 1.0 - eps_low),
      'dual_clip': neg & (pg > dual_bound),
  }
  return pg_out, flags


def top_frac_mask(score_BxT: Array, mask_BxT: Array, frac: float) -> Array:
  """[B, T] float32: mask kept on each row's ceil(frac * n_valid) highest scores (ties by position)."""
  m = jnp.asarray(mask_BxT, jnp.float32)
  s = jax.lax.stop_gradient(jnp.asarray(score_BxT, jnp.float32))
  s_masked = jnp.where(m > 0, s, -jnp.inf)
  order_BxT = jnp.argsort(-s_masked, axis=-1, stable=True)
  rank_BxT = jnp.argsort(order_BxT, axis=-1)  # 0 = highest score of the row
  # The small offset keeps float error from turning 0.2 * 15 = 3.0000001 into 4 tokens.
  n_keep_B = jnp.ceil(frac * jnp.sum(m, axis=-1) - 1e-4)
  return m * (rank_BxT < n_keep_B[:, None]).astype(jnp.float32)


def gamma_schedule(step, total_steps, gamma_start: float, gamma_end: float):
  """Linear gamma annealing -> (gamma_now, entropy_scale = gamma_now / gamma_start), float32."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(float(total_steps), 1.0), 0.0, 1.0)
  gamma_now = jnp.float32(gamma_start) + (jnp.float32(gamma_end) - jnp.float32(gamma_start)) * frac
  scale = gamma_now / gamma_start if gamma_start != 0 else jnp.float32(1.0)
  return gamma_now, jnp.asarray(scale, jnp.float32)


def _is_zero(x: Any) -> bool:
  """True for a Python/NumPy scalar equal to 0 (a traced value is never statically zero)."""
  return not isinstance(x, jax.core.Tracer) and jnp.ndim(x) == 0 and float(x) == 0.0


# ----------------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------------


def papo_loss(logp_BxT: Array, old_logp_BxT: Array, ref_logp_BxT: Array | None,
              mask_logp_BxT: Array | None, advantages: Array, response_mask_BxT: Array,
              cfg: LossConfig, *, gamma=None, entropy_scale=1.0
              ) -> tuple[Array, dict[str, Array]]:
  """Scalar PAPO loss and scalar metrics.

  L = agg(pg) + beta*agg(k3(lp, lp_ref)) - gamma*agg(k3(lp, lp_mask))
      + eta_ori*s*agg(-lp) + eta_mask*s*agg(-lp_mask),  s = entropy_scale.
  advantages: [B] or [B, T]. gamma (default cfg.gamma) and entropy_scale may be traced
  scalars. Terms whose coefficient is a static 0 or whose input is None are left out of
  the graph. mask_logp carries gradient or not as the caller built it (papo.mask_grad).
  """
  lp = jnp.asarray(logp_BxT, jnp.float32)
  m = jnp.asarray(response_mask_BxT, jnp.float32)
  if lp.ndim != 2 or lp.shape != m.shape:
    raise ValueError(f'papo_loss: logp shape {lp.shape} and response mask shape {m.shape} '
                     'must be equal [B, T]')
  adv = jnp.asarray(advantages, jnp.float32)
  if adv.ndim == 1:
    adv = adv[:, None]
  if adv.shape[0] != lp.shape[0] or adv.ndim != 2:
    raise ValueError(f'papo_loss: advantages shape {jnp.shape(advantages)} does not fit logp {lp.shape}')
  adv = jnp.broadcast_to(adv, lp.shape)
  gamma = cfg.gamma if gamma is None else gamma

  def agg(x):
    return agg_tokens(x, m, cfg.agg)

  def tokmean(x, mask=m):
    return jax.lax.stop_gradient(agg_tokens(x, mask, 'token'))

  metrics = {}
  pg_BxT, flags = ppo_dual_clip(lp, old_logp_BxT, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
  pg_loss = agg(pg_BxT)
  loss = pg_loss
  metrics['actor/pg_loss'] = pg_loss
  metrics['actor/clipfrac_high'] = tokmean(flags['clip_high'])
  metrics['actor/clipfrac_low'] = tokmean(flags['clip_low'])
  metrics['actor/dual_clip_frac'] = tokmean(flags['dual_clip'])
  metrics['actor/ppo_kl'] = tokmean(jnp.asarray(old_logp_BxT, jnp.float32) - lp)

  if ref_logp_BxT is not None:
    kl_ref = agg(k3(lp, ref_logp_BxT))
    metrics['actor/kl_ref'] = kl_ref
    if not _is_zero(cfg.beta):
      loss = loss + cfg.beta * kl_ref

  if mask_logp_BxT is not None:
    k_BxT = k3(lp, mask_logp_BxT)
    kl_prcp = agg(k_BxT)
    metrics['actor/kl_prcp'] = kl_prcp  # positive; the authors logged it negated
    m_prcp = m
    if cfg.kl_prcp_top_frac is not None:  # select on the raw KL, before any clamp
      m_prcp = top_frac_mask(k_BxT, m, cfg.kl_prcp_top_frac)
      metrics['actor/kl_prcp_top_frac_kept'] = tokmean(m_prcp)
    if cfg.kl_prcp_clamp is not None:
      k_BxT = jnp.clip(k_BxT, cfg.kl_prcp_clamp[0], cfg.kl_prcp_clamp[1])
    if cfg.kl_prcp_top_frac is not None or cfg.kl_prcp_clamp is not None:
      kl_prcp = agg_tokens(k_BxT, m_prcp, cfg.agg)
      metrics['actor/kl_prcp_guarded'] = kl_prcp
    if not _is_zero(gamma):
      loss = loss - gamma * kl_prcp
      metrics['actor/gamma'] = jnp.asarray(gamma, jnp.float32)

  if not _is_zero(cfg.eta_ori):
    loss = loss + cfg.eta_ori * entropy_scale * agg(-lp)
  metrics['actor/entropy_ori'] = tokmean(-lp)

  if mask_logp_BxT is not None:
    lp_mask = jnp.asarray(mask_logp_BxT, jnp.float32)
    if not _is_zero(cfg.eta_mask):
      loss = loss + cfg.eta_mask * entropy_scale * agg(-lp_mask)
    metrics['actor/entropy_mask'] = tokmean(-lp_mask)

  metrics['actor/loss'] = loss
  metrics = {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}
  return loss, metrics
