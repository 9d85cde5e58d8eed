"""PAPO loss (papo.md section 2): PPO dual-clip + ref KL - gamma * perception KL + entropies.

Pure functions of arrays and config scalars returning `(loss, metrics)`; no model inside.
All arithmetic is float32 whatever the input dtype. Shapes: B sequences, T response
tokens; `mask_BxT` is 1 on response tokens up to and including EOS.

The definitions follow the authors' code (a fork of EasyR1/verl):
`verl/trainer/core_algos.py` (`compute_policy_loss`, `compute_kl`, `average_loss`) and
`verl/workers/actor/dp_actor.py` (`update_policy`). Where this project keeps its own
behaviour it is a named option, and the tests hold both against float64 references.
Every clamp has torch's `clamp` gradient (`clamp_torch`): passed through at the bound.

Options beyond PAPO (off by default; see `rl/vppo.py`):
- VPPO (Spotlight on Token Perception): trajectory advantage reweighting by mean visual
  dependency and a top-fraction token mask on the policy-gradient term.
- Adaptive per-sample gamma: gamma_i = gamma * f_i, f_i the sample's mean dependency
  relative to its group's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from papo_jax.rl import vppo

LOG_RATIO_CLIP = 20.0  # |lp - lp_old| and |lp_other - lp| are clipped to this
K3_CLIP = 10.0  # k3 is clipped to [-K3_CLIP, K3_CLIP]
AGG_EPS = 1e-8
AGG_MODES = ('token', 'seq_mean_token_mean')
TOP_MODES = ('quantile', 'rank_kept')
DEPENDENCY_KINDS = ('k3', 'full_kl')
GAMMA_HORIZON_FRAC = 0.5  # the authors anneal over int(0.5 * steps) by default (ray_trainer.py)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss configuration (hashable: pass as a static jit argument).

  beta: reference-KL coefficient; gamma: perception-KL coefficient (subtracted, i.e. the
  KL is maximised); eta_ori / eta_mask: coefficients of tokmean(-lp) / tokmean(-lp_mask)
  (always a token mean, as the authors: `-VF.masked_mean(log_probs, response_mask)`).
  agg: aggregation of the PPO, reference-KL and perception-KL terms.
  kl_prcp_clamp: (lo, hi) per-token clamp of the perception KL, e.g. (0.0, 0.2).
  kl_prcp_top_frac: keep only this fraction of each sequence's tokens, by perception KL.
  kl_prcp_top_mode: 'quantile' (the authors: threshold = per-row `nanquantile(k, 1 - frac)`,
    linear interpolation; tokens with k >= threshold kept, the others zeroed, and the term
    averaged over ALL response tokens) or 'rank_kept' (the first version of this project:
    the ceil(frac * n) highest tokens, averaged over the kept tokens only, i.e. an effective
    gamma about 1/frac times the authors').

  VPPO (`rl/vppo.py`; values of the paper's 7B run: top_frac 0.4, adv_scale_min 0.9):
  vppo_top_frac: the policy-gradient term keeps each sequence's ceil(frac * n) tokens of
    highest visual dependency (zeroed elsewhere, still averaged over all response tokens).
  vppo_adv_scale_min: trajectory reweighting of the advantages by mean dependency, mapped
    to [min, max] with a mean of 1 (their `advantage_scaling_min`).
  vppo_minmax_chunk / vppo_mean_chunk: None normalises over the whole batch given; row
    counts reproduce their per-device mini-batch (min/max) and micro-batch (mean) sets.
  vppo_dependency: 'k3' (their one-sample estimate from log-probs) or 'full_kl' (the
    caller passes the full-distribution KL as `dependency_BxT`, see `vppo.full_kl_chunked`).

  Adaptive gamma (off by default): adaptive_gamma scales each sample's perception KL by
  `vppo.adaptive_gamma_factor` (mean dependency / group mean, clipped to
  [0, adaptive_gamma_max]); groups are consecutive runs of `group_size` rows.
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
  kl_prcp_top_mode: str = 'quantile'
  vppo_top_frac: float | None = None
  vppo_adv_scale_min: float | None = None
  vppo_minmax_chunk: int | None = None
  vppo_mean_chunk: int | None = None
  vppo_dependency: str = 'k3'
  adaptive_gamma: bool = False
  adaptive_gamma_max: float = 2.0
  group_size: int | None = None

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
    if self.kl_prcp_top_mode not in TOP_MODES:
      raise ValueError(f'LossConfig kl_prcp_top_mode={self.kl_prcp_top_mode!r}: expected one of {TOP_MODES}')
    if self.vppo_top_frac is not None and not 0.0 < self.vppo_top_frac <= 1.0:
      raise ValueError(f'LossConfig vppo_top_frac={self.vppo_top_frac}: must be in (0, 1]')
    if self.vppo_adv_scale_min is not None and not 0.0 <= self.vppo_adv_scale_min <= 1.0:
      raise ValueError(f'LossConfig vppo_adv_scale_min={self.vppo_adv_scale_min}: must be in [0, 1]')
    for name in ('vppo_minmax_chunk', 'vppo_mean_chunk', 'group_size'):
      v = getattr(self, name)
      if v is not None and (int(v) != v or v < 1):
        raise ValueError(f'LossConfig {name}={v}: must be a positive integer or None')
    if self.vppo_dependency not in DEPENDENCY_KINDS:
      raise ValueError(f'LossConfig vppo_dependency={self.vppo_dependency!r}: expected one of '
                       f'{DEPENDENCY_KINDS}')
    if self.adaptive_gamma_max <= 0.0:
      raise ValueError(f'LossConfig adaptive_gamma_max={self.adaptive_gamma_max}: must be > 0')

  @property
  def needs_dependency(self) -> bool:
    """True when the loss reads a per-token visual dependency (VPPO or adaptive gamma)."""
    return (self.vppo_top_frac is not None or self.vppo_adv_scale_min is not None
            or self.adaptive_gamma)

  @property
  def needs_sequence_factors(self) -> bool:
    """True when the loss takes per-sequence factors normalised over a whole update batch
    (`sequence_factors`: VPPO's advantage scale, adaptive gamma); the top-fraction token
    mask alone is per sequence and needs none."""
    return self.vppo_adv_scale_min is not None or self.adaptive_gamma


# ----------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------


def clamp_torch(x: Array, lo: float | None, hi: float | None) -> Array:
  """`clip(x, lo, hi)` with torch.clamp's gradient: 1 on lo <= x <= hi (bounds included), else 0.

  `jnp.clip` is min(max(x, lo), hi) and JAX splits the gradient of a tie in half, so a value
  sitting on a bound (e.g. an on-policy ratio with eps_low = 0) would get half its gradient.
  """
  x = jnp.asarray(x)
  inside = jnp.ones(x.shape, bool)
  if lo is not None:
    inside = inside & (x >= lo)
  if hi is not None:
    inside = inside & (x <= hi)
  return jnp.where(inside, x, jnp.clip(x, lo, hi))


def agg_tokens(x_BxT: Array, mask_BxT: Array, mode: str = 'token') -> Array:
  """Scalar: 'token' = sum(x*m)/(sum(m)+1e-8); 'seq_mean_token_mean' = mean over sequences.

  'seq_mean_token_mean' averages the per-row token means over the rows that have tokens.
  The authors' 'seq' (`average_loss`) also counts rows without tokens (as 0) in the mean;
  every real response has at least its EOS token, so the two agree on every real batch,
  and rows without tokens exist here only as static-shape padding, which must not dilute
  the loss.
  """
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
  """[B, T] Schulman's k3 estimate of KL(pi || pi_other), float32, clipped to [-10, 10].

  The authors' `compute_kl(..., 'low_var_kl')`; the clamps have torch's gradient.
  """
  x = clamp_torch(jnp.asarray(lp_other_BxT, jnp.float32) - jnp.asarray(lp_BxT, jnp.float32),
                  -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
  return clamp_torch(jnp.exp(x) - x - 1.0, -K3_CLIP, K3_CLIP)


def ppo_dual_clip(lp_BxT: Array, old_lp_BxT: Array, adv_BxT: Array, eps_low: float,
                  eps_high: float, dual_clip: float) -> tuple[Array, dict[str, Array]]:
  """[B, T] PPO clipped surrogate with asymmetric clip and dual clip, plus [B, T] clip flags.

  The authors' `compute_policy_loss`. Flags, by their definitions:
  'pg_clipfrac_higher': the clipped ratio won the max (-A*ratio < -A*clip(ratio)), i.e. the
    clip binds on either side (ratio > 1+eps_high with A > 0, ratio < 1-eps_low with A < 0);
  'pg_clipfrac_lower': A < 0 and the dual clip binds (max(...) > -A * dual_clip).
  """
  lp = jnp.asarray(lp_BxT, jnp.float32)
  adv = jnp.asarray(adv_BxT, jnp.float32)
  d = clamp_torch(lp - jnp.asarray(old_lp_BxT, jnp.float32), -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
  ratio = jnp.exp(d)
  cratio = jnp.exp(clamp_torch(d, math.log(1.0 - eps_low), math.log(1.0 + eps_high)))
  pg1 = -adv * ratio
  pg2 = -adv * cratio
  pg = jnp.maximum(pg1, pg2)  # ties split the gradient in half, as torch.max
  neg = adv < 0
  dual_bound = -adv * dual_clip
  pg_out = jnp.where(neg, jnp.minimum(pg, dual_bound), pg)
  flags = {
      'pg_clipfrac_higher': pg1 < pg2,
      'pg_clipfrac_lower': neg & (pg > dual_bound),
  }
  return pg_out, flags


def top_frac_mask(score_BxT: Array, mask_BxT: Array, frac: float) -> Array:
  """[B, T] float32: mask kept on each row's ceil(frac * n_valid) highest scores (ties by position).

  n_keep is computed in float32 as torch does (`ceil(num_valid_tokens * top_p)`, VPPO's
  dp_actor.py); their `torch.sort` breaks ties arbitrarily, this one by position.
  """
  m = jnp.asarray(mask_BxT, jnp.float32)
  s = jax.lax.stop_gradient(jnp.asarray(score_BxT, jnp.float32))
  s_masked = jnp.where(m > 0, s, -jnp.inf)
  order_BxT = jnp.argsort(-s_masked, axis=-1, stable=True)
  rank_BxT = jnp.argsort(order_BxT, axis=-1)  # 0 = highest score of the row
  n_keep_B = jnp.ceil(jnp.sum(m, axis=-1) * jnp.float32(frac))
  return m * (rank_BxT < n_keep_B[:, None]).astype(jnp.float32)


def row_nanquantile(x_BxT: Array, mask_BxT: Array, q: float) -> Array:
  """[B] float32 `torch.nanquantile(where(mask, x, nan), q, dim=1)` (linear interpolation).

  ranks = q * (n_valid - 1) in float32; value = lerp(sorted[floor], sorted[ceil], frac)
  with torch's lerp formula (torch's CPU kernel fuses the multiply-add, so the value may
  differ by 1 ulp). Rows without valid entries give NaN, as torch.
  """
  m = jnp.asarray(mask_BxT) > 0
  x = jnp.asarray(x_BxT, jnp.float32)
  sorted_BxT = jnp.sort(jnp.where(m, x, jnp.inf), axis=-1)  # valid entries first, ascending
  n_B = jnp.sum(m, axis=-1)
  rank_B = jnp.float32(q) * (n_B - 1).astype(jnp.float32)
  below_B = jnp.clip(rank_B.astype(jnp.int32), 0, x.shape[-1] - 1)
  above_B = jnp.clip(jnp.ceil(rank_B).astype(jnp.int32), 0, x.shape[-1] - 1)
  w_B = rank_B - below_B.astype(jnp.float32)
  lo_B = jnp.take_along_axis(sorted_BxT, below_B[:, None], -1)[:, 0]
  hi_B = jnp.take_along_axis(sorted_BxT, above_B[:, None], -1)[:, 0]
  # torch.lerp: weight < 0.5 ? start + w * (end - start) : end - (end - start) * (1 - w)
  val_B = jnp.where(w_B < 0.5, lo_B + w_B * (hi_B - lo_B), hi_B - (hi_B - lo_B) * (1.0 - w_B))
  return jnp.where(n_B > 0, val_B, jnp.nan)


def quantile_top_mask(score_BxT: Array, mask_BxT: Array, frac: float) -> Array:
  """[B, T] float32: the authors' top-fraction token mask: score >= nanquantile(score, 1 - frac).

  `dp_actor.py` (use_kl_prcp_token_level_mask): ties at the threshold are all kept, so a
  row may keep more than frac of its tokens.
  """
  m = jnp.asarray(mask_BxT, jnp.float32)
  s = jax.lax.stop_gradient(jnp.asarray(score_BxT, jnp.float32))
  thresh_B = row_nanquantile(s, m, 1.0 - frac)
  return m * (s >= thresh_B[:, None]).astype(jnp.float32)


def gamma_schedule(step, total_steps, gamma_start: float, gamma_end: float,
                   horizon_frac: float = GAMMA_HORIZON_FRAC):
  """Linear gamma annealing -> (gamma_now, entropy_scale = gamma_now / gamma_start), float32.

  The authors' `AnnealingKLController` as `ray_trainer.py` builds it: the coefficient
  moves from gamma_start to gamma_end over horizon = max(1, int(total_steps * horizon_frac))
  steps (their `annealing_ratio`, default 0.5; their `end_value` default is 0) and stays at
  gamma_end after. `step` counts completed steps (0 for the first). horizon_frac=1.0 is
  the first version of this project (annealing over all steps).
  """
  if not 0.0 < horizon_frac <= 1.0:
    raise ValueError(f'gamma_schedule horizon_frac={horizon_frac}: must be in (0, 1]')
  horizon = max(1, int(total_steps * horizon_frac))
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / float(horizon), 1.0)
  frac = jnp.maximum(frac, 0.0)
  gamma_now = jnp.float32(gamma_start) + (jnp.float32(gamma_end) - jnp.float32(gamma_start)) * frac
  scale = gamma_now / gamma_start if gamma_start != 0 else jnp.float32(1.0)
  return gamma_now, jnp.asarray(scale, jnp.float32)


def _is_zero(x: Any) -> bool:
  """True for a Python/NumPy scalar equal to 0 (a traced value is never statically zero)."""
  return not isinstance(x, jax.core.Tracer) and jnp.ndim(x) == 0 and float(x) == 0.0


def sequence_factors(cfg: LossConfig, old_logp: Array | None, mask_logp: Array | None,
                     response_mask: Array, dependency: Array | None = None) -> dict[str, Array]:
  """Per-sequence factors of the VPPO / adaptive-gamma options over a whole update batch.

  Arrays are [..., T] (e.g. the train step's [M, B, T]); rows are the flattened leading
  axes in order, groups consecutive runs of `cfg.group_size` rows. Returns a dict with
  'adv_scale' and/or 'gamma_factor', each shaped like the leading axes, to pass to
  `papo_loss` slice by slice (normalising over micro-batches would make the result
  depend on the micro-batch size). Empty when no option is on.
  """
  if not cfg.needs_sequence_factors:
    return {}
  m = jnp.asarray(response_mask, jnp.float32)
  lead = m.shape[:-1]
  dep = _dependency(cfg, old_logp, mask_logp, dependency)
  score_R = vppo.sequence_dependency(dep.reshape(-1, m.shape[-1]), m.reshape(-1, m.shape[-1]))
  valid_R = m.reshape(-1, m.shape[-1]).sum(-1) > 0
  out = {}
  if cfg.vppo_adv_scale_min is not None:
    out['adv_scale'] = vppo.advantage_scale(score_R, valid_R, cfg.vppo_adv_scale_min,
                                            minmax_chunk=cfg.vppo_minmax_chunk,
                                            mean_chunk=cfg.vppo_mean_chunk).reshape(lead)
  if cfg.adaptive_gamma:
    if cfg.group_size is None:
      raise ValueError('LossConfig adaptive_gamma=True needs group_size (rollouts per prompt)')
    out['gamma_factor'] = vppo.adaptive_gamma_factor(score_R, valid_R, cfg.group_size,
                                                     f_max=cfg.adaptive_gamma_max).reshape(lead)
  return out


def _dependency(cfg: LossConfig, old_logp, mask_logp, dependency) -> Array:
  """[..., T] per-token visual dependency, no gradient: given, or VPPO's k3 from log-probs."""
  if dependency is not None:
    return jax.lax.stop_gradient(jnp.asarray(dependency, jnp.float32))
  if cfg.vppo_dependency == 'full_kl':
    raise ValueError("LossConfig vppo_dependency='full_kl': pass the dependency array "
                     '(vppo.full_kl_chunked) as dependency_BxT')
  if old_logp is None or mask_logp is None:
    raise ValueError('visual dependency needs old and masked-image log-probs (or dependency_BxT)')
  return vppo.token_dependency(jax.lax.stop_gradient(old_logp), jax.lax.stop_gradient(mask_logp))


# ----------------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------------


def papo_loss(logp_BxT: Array, old_logp_BxT: Array, ref_logp_BxT: Array | None,
              mask_logp_BxT: Array | None, advantages: Array, response_mask_BxT: Array,
              cfg: LossConfig, *, gamma=None, entropy_scale=1.0, dependency_BxT: Array | None = None,
              adv_scale_B: Array | None = None, gamma_factor_B: Array | None = None,
              ) -> tuple[Array, dict[str, Array]]:
  """Scalar PAPO loss and scalar metrics.

  L = agg(v * pg) + beta*agg(k3(lp, lp_ref)) - gamma*agg(guard(f * k3(lp, lp_mask)))
      + eta_ori*s*tokmean(-lp) + eta_mask*s*tokmean(-lp_mask),  s = entropy_scale,
  where pg uses the advantages times the VPPO scale (1 by default), v is the VPPO token
  mask (1 by default), f the adaptive-gamma factor (1 by default) and guard the optional
  top-fraction mask then clamp (the authors' order: weight, mask, clamp).
  advantages: [B] or [B, T]. gamma (default cfg.gamma) and entropy_scale may be traced
  scalars. Terms whose coefficient is a static 0 or whose input is None are left out of
  the graph. mask_logp carries gradient or not as the caller built it (papo.mask_grad).
  dependency_BxT: per-token visual dependency (default: VPPO's k3 of old vs masked
  log-probs, no gradient). adv_scale_B / gamma_factor_B: from `sequence_factors` over the
  whole update batch; when None they are computed over the rows given here.
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
  dep = None
  if cfg.needs_dependency:
    dep = _dependency(cfg, old_logp_BxT, mask_logp_BxT, dependency_BxT)
    if dep.shape != lp.shape:
      raise ValueError(f'papo_loss: dependency shape {dep.shape} does not fit logp {lp.shape}')
    metrics['vppo/dependency'] = tokmean(dep)
    need = {}
    if cfg.vppo_adv_scale_min is not None and adv_scale_B is None:
      need['adv_scale'] = True
    if cfg.adaptive_gamma and gamma_factor_B is None:
      need['gamma_factor'] = True
    if need:
      own = sequence_factors(cfg, None, None, m, dependency=dep)
      adv_scale_B = own['adv_scale'] if 'adv_scale' in need else adv_scale_B
      gamma_factor_B = own['gamma_factor'] if 'gamma_factor' in need else gamma_factor_B

  if cfg.vppo_adv_scale_min is not None:
    scale_B = jax.lax.stop_gradient(jnp.asarray(adv_scale_B, jnp.float32))
    adv = adv * scale_B[:, None]
    metrics['vppo/adv_scale_mean'] = jnp.mean(scale_B)

  pg_BxT, flags = ppo_dual_clip(lp, old_logp_BxT, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
  if cfg.vppo_top_frac is not None:
    keep_BxT = top_frac_mask(dep, m, cfg.vppo_top_frac)
    pg_BxT = pg_BxT * keep_BxT  # dropped tokens count in the mean as 0 (VPPO core_algos.py)
    metrics['vppo/token_frac'] = tokmean(keep_BxT)
  pg_loss = agg(pg_BxT)
  loss = pg_loss
  metrics['actor/pg_loss'] = pg_loss
  metrics['actor/pg_clipfrac_higher'] = tokmean(flags['pg_clipfrac_higher'])
  metrics['actor/pg_clipfrac_lower'] = tokmean(flags['pg_clipfrac_lower'])
  # The authors' metric: masked mean of -clamp(lp - lp_old, -20, 20).
  metrics['actor/ppo_kl'] = tokmean(-jnp.clip(lp - jnp.asarray(old_logp_BxT, jnp.float32),
                                              -LOG_RATIO_CLIP, LOG_RATIO_CLIP))

  if ref_logp_BxT is not None:
    kl_ref = agg(k3(lp, ref_logp_BxT))
    metrics['actor/kl_ref'] = kl_ref
    if not _is_zero(cfg.beta):
      loss = loss + cfg.beta * kl_ref

  if mask_logp_BxT is not None:
    k_BxT = k3(lp, mask_logp_BxT)
    kl_prcp = agg(k_BxT)
    metrics['actor/kl_prcp'] = kl_prcp  # positive; the authors logged it negated
    guarded = False
    if cfg.adaptive_gamma:  # the authors' per-sample `kl_prcp_weighting`, applied first
      f_B = jax.lax.stop_gradient(jnp.asarray(gamma_factor_B, jnp.float32))
      k_BxT = k_BxT * f_B[:, None]
      metrics['papo/gamma_factor_mean'] = jnp.mean(f_B)
      guarded = True
    if cfg.kl_prcp_top_frac is not None:  # select before the clamp, as the authors
      if cfg.kl_prcp_top_mode == 'quantile':
        keep_BxT = quantile_top_mask(k_BxT, m, cfg.kl_prcp_top_frac)
        k_BxT = k_BxT * keep_BxT
        m_prcp = m
      else:
        keep_BxT = m_prcp = top_frac_mask(k_BxT, m, cfg.kl_prcp_top_frac)
      metrics['actor/kl_prcp_top_frac_kept'] = tokmean(keep_BxT)
      guarded = True
    else:
      m_prcp = m
    if cfg.kl_prcp_clamp is not None:
      k_BxT = clamp_torch(k_BxT, cfg.kl_prcp_clamp[0], cfg.kl_prcp_clamp[1])
      guarded = True
    if guarded:
      kl_prcp = agg_tokens(k_BxT, m_prcp, cfg.agg)
      metrics['actor/kl_prcp_guarded'] = kl_prcp
    if not _is_zero(gamma):
      loss = loss - gamma * kl_prcp
      metrics['actor/gamma'] = jnp.asarray(gamma, jnp.float32)

  # Both entropy estimates are token means whatever cfg.agg (the authors' masked_mean).
  if not _is_zero(cfg.eta_ori):
    loss = loss + cfg.eta_ori * entropy_scale * agg_tokens(-lp, m, 'token')
  metrics['actor/entropy_ori'] = tokmean(-lp)

  if mask_logp_BxT is not None:
    lp_mask = jnp.asarray(mask_logp_BxT, jnp.float32)
    if not _is_zero(cfg.eta_mask):
      loss = loss + cfg.eta_mask * entropy_scale * agg_tokens(-lp_mask, m, 'token')
    metrics['actor/entropy_mask'] = tokmean(-lp_mask)

  metrics['actor/loss'] = loss
  metrics = {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}
  return loss, metrics
