"""The fused, jitted PAPO train step.

One XLA program per bucket shape takes a batch of pre-sampled rollouts and:

1. runs the policy on the original inputs and on the masked copy (same tokens and
   positions, different pixels) and the frozen reference model on the original inputs
   under stop-gradient. With ``mask_grad=False`` (the paper) the masked pass is
   forward-only, outside the differentiated function, so PAPO costs one extra forward
   over GRPO; with ``mask_grad=True`` the policy runs once on the batch-concatenated
   ``[original ; masked]`` inputs and the gradient flows through both halves;
2. extracts response-token log-probs in sequence chunks (so ``[B, L, V]`` float32
   logits never exist at once);
3. computes the PAPO loss, its gradient, global-norm clipping and the optax update,
   skipping the update when the gradient is not finite.

Per-sequence factors that are normalised over the whole update batch (VPPO's advantage
scale, adaptive gamma; ``losses.sequence_factors``) are computed once from the batch's
precomputed old and masked-image log-probs before the micro-batch scan, and each
micro-batch's loss takes its slice, so the update does not depend on the micro-batch
size. Those log-probs come from :func:`make_logprob_pass` (``StepConfig.needs_logprob_pass``).

Sequences are laid out as ``[prompt (Lp, left padded) | response (T, right padded)]``.
Every array of a :class:`TrainBatch` has a leading micro-batch axis M; micro-batches are
accumulated with ``lax.scan`` so memory is bounded by one micro-batch, and each
micro-batch's loss is weighted by its share of response tokens (or sequences), so the
update equals the one of the whole batch at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from papo_jax.models.vision import SharedImages
from papo_jax.rl.losses import LossConfig, papo_loss, sequence_factors

Array = jax.Array


@flax.struct.dataclass
class TrainBatch:
  """Rollouts for one optimizer update; every field has a leading micro-batch axis M.

  input_ids_MxBxL: prompt ⊕ response tokens; attention_mask_MxBxL; position_ids_Mx3xBxL
  (from the model's get_rope_index, shared by the masked copy); response_mask_MxBxT
  (1 up to and including EOS); advantages_MxB. Optional precomputed log-probs [M, B, T]
  (several mini-batches per step): old_logp, mask_logp, ref_logp.

  Images come in one of two layouts:

  * per batch shard (``row_image_start`` set; :func:`papo_jax.rl.batching.assemble_train_batch`):
    each micro-batch's B rows are split into S contiguous shards (S = the batch mesh axes'
    size) and shard s carries the *distinct* images of its rows once:
    pixel_values / masked_pixel_values [M, S, N, P], image_grid_thw [M, S, I, 3],
    row_image_start [M, B] (which of its shard's images is the row's first). Shard the S
    axis like the rows (``(None, "batch")``): each device encodes only its rows' images.
  * one list per micro-batch (``row_image_start`` None): pixel_values / masked_pixel_values
    [M, N, P] (every row's images in row order, zero-padded), image_grid_thw [M, I, 3].
  """
  input_ids: Array
  attention_mask: Array
  response_mask: Array
  advantages: Array
  position_ids: Array | None = None   # None: computed in the step from ids, images and mask
  pixel_values: Array | None = None
  masked_pixel_values: Array | None = None
  image_grid_thw: Array | None = None
  row_image_start: Array | None = None
  old_logp: Array | None = None
  mask_logp: Array | None = None
  ref_logp: Array | None = None
  dependency: Array | None = None   # [M, B, T] full-distribution visual dependency (vppo.dependency=full_kl)

  def images(self, masked: bool = False):
    """(pixels, grid) as the model takes them: a :class:`SharedImages` and None in the
    per-shard layout, else the patch list and its grids; (None, None) without images."""
    pv = self.masked_pixel_values if masked else self.pixel_values
    if pv is None:
      return None, None
    if self.row_image_start is not None:
      return SharedImages(pv, self.image_grid_thw, self.row_image_start), None
    return pv, self.image_grid_thw


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any          # nnx.State of the policy
  opt_state: Any


def needs_masked_images(gamma: float, eta_mask: float, dependency: bool = False) -> bool:
  """The one rule: masked-image log-probs enter the loss iff the perception KL (gamma), the
  masked entropy (eta_mask) or the visual dependency (``LossConfig.needs_dependency``: VPPO,
  adaptive gamma) is on. Masking in the data pipeline must follow it too."""
  return gamma != 0.0 or eta_mask != 0.0 or bool(dependency)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static switches of the step (hashable). Gradient clipping lives in :func:`make_optimizer`."""
  loss: LossConfig
  mask_grad: bool = False        # True: gradient also flows through the masked path ("true double entropy")
  logprob_chunk: int = 256       # response tokens per log-prob chunk

  @property
  def needs_mask(self) -> bool:
    return needs_masked_images(self.loss.gamma, self.loss.eta_mask, self.loss.needs_dependency)

  @property
  def needs_logprob_pass(self) -> bool:
    """The step needs the batch's old and masked log-probs before its first micro-batch
    (whole-batch sequence factors), so the trainer runs :func:`make_logprob_pass` even with
    one mini-batch per step. The full-distribution dependency (``vppo_dependency='full_kl'``)
    comes from that pass as well."""
    return self.loss.needs_sequence_factors or self.full_kl_dependency

  @property
  def full_kl_dependency(self) -> bool:
    """The loss reads the full-distribution visual dependency, which the log-prob pass computes
    (``TrainBatch.dependency``); otherwise the loss takes k3 from the two log-probs."""
    return self.loss.needs_dependency and self.loss.vppo_dependency == "full_kl"

  @property
  def needs_ref(self) -> bool:
    return self.loss.beta != 0.0


def make_optimizer(lr: float | optax.Schedule, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, as in the paper (weight decay on all parameters)."""
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def init_train_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# -- log-probs -------------------------------------------------------------------------------


def response_logprobs(model, input_ids_BxL, attention_mask_BxL, position_ids_3xBxL, pixel_values, image_grid_thw,
                      response_len: int, chunk: int) -> Array:
  """log p(response token) [B, T] float32; logits are formed ``chunk`` tokens at a time.

  The hidden state at position Lp + t - 1 predicts response token t. ``pixel_values`` may be
  a :class:`SharedImages` (``image_grid_thw`` None); position ids None are computed.
  """
  h_BxTxD = response_hidden(model, input_ids_BxL, attention_mask_BxL, position_ids_3xBxL, pixel_values,
                            image_grid_thw, response_len)
  targets_BxT = input_ids_BxL[:, input_ids_BxL.shape[1] - response_len:]
  return chunked_token_logprobs(model, h_BxTxD, targets_BxT, chunk)


def response_hidden(model, input_ids_BxL, attention_mask_BxL, position_ids_3xBxL, pixel_values, image_grid_thw,
                    response_len: int) -> Array:
  """[B, T, D] the hidden states that predict the response tokens (position Lp + t - 1 for token t)."""
  hidden = model.hidden_states(input_ids_BxL, attention_mask_BxL, pixel_values, image_grid_thw, position_ids_3xBxL)
  l = input_ids_BxL.shape[1]
  return hidden[:, l - response_len - 1:l - 1]


def chunked_token_logprobs(model, h_BxTxD: Array, targets_BxT: Array, chunk: int) -> Array:
  b, t, d = h_BxTxD.shape
  chunk = min(chunk, t)
  pad = (-t) % chunk
  h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
  y = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  h = h.reshape(b, n, chunk, d).swapaxes(0, 1)
  y = y.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(h_BxCxD, y_BxC):
    # With model.gather_weights (few rows per chip), split over the vocabulary: the tied [V, D] head is
    # neither gathered nor its gradient formed whole per device. At 10 rows per chip (3B on v5p-8) the
    # split costs more than it saves (47.8 -> 59.5 GiB per chip), so it follows the same switch.
    logits = model.logits(h_BxCxD, dtype=jnp.float32, vocab_split=model.config.gather_weights)
    tgt = jnp.take_along_axis(logits, y_BxC[..., None], -1)[..., 0]
    return tgt - jax.nn.logsumexp(logits, axis=-1)

  lp = jax.lax.map(lambda xs: one(*xs), (h, y))          # [n, B, C]
  return lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def stack_patch_lists(pixel_values_NxP, masked_pixel_values_NxP, n_real):
  """One patch list for the batch [original rows ; masked rows] (per-micro-batch layout).

  The vision tower takes all real patches first and bucket padding last, so the result is
  ``[original real | masked real | original padding | masked padding]`` ([2N, P]), where
  the first ``n_real`` rows of each input are real.
  """
  n = pixel_values_NxP.shape[0]
  i = jnp.arange(2 * n)
  j = i - 2 * n_real                                   # position within the padding part
  src = jnp.where(i < n_real, i,                       # original real
                  jnp.where(i < 2 * n_real, n + i - n_real,   # masked real
                            jnp.where(j < n - n_real, n_real + j,   # original padding
                                      n + n_real + j - (n - n_real))))  # masked padding
  return jnp.concatenate([pixel_values_NxP, masked_pixel_values_NxP], 0)[src]


def with_masked_copy(model, micro: TrainBatch):
  """(ids, mask, positions, pixels, grid) of the batch [original ; masked]: same tokens and
  positions, masked pixels in the second half."""
  cat = lambda a, axis=0: jnp.concatenate([a, a], axis=axis)
  pos = micro.position_ids
  if pos is None:  # the masked copy shares the original's positions
    pos = model.positions(micro.input_ids, micro.images()[0] if micro.row_image_start is not None
                          else micro.image_grid_thw, micro.attention_mask)[0]
  pv = grid = None
  if micro.pixel_values is not None and micro.row_image_start is not None:
    # Per-shard layout: the masked rows form S more shards after the original S.
    pv = SharedImages(jnp.concatenate([micro.pixel_values, micro.masked_pixel_values], 0),
                      cat(micro.image_grid_thw), cat(micro.row_image_start))
  elif micro.pixel_values is not None:
    n_real = jnp.sum(jnp.prod(micro.image_grid_thw, axis=-1))
    pv = stack_patch_lists(micro.pixel_values, micro.masked_pixel_values, n_real)
    grid = cat(micro.image_grid_thw)
  return cat(micro.input_ids), cat(micro.attention_mask), cat(pos, 1), pv, grid


def _micro(batch: TrainBatch, i):
  return jax.tree.map(lambda a: a[i], batch)


def micro_logprobs(cfg: StepConfig, model, micro: TrainBatch, *, with_mask: bool) -> tuple[Array, Array | None]:
  """Policy log-probs on the original (and, if asked, masked) inputs of one micro-batch."""
  t = micro.response_mask.shape[-1]
  if with_mask:
    ids, am, pos, pv, grid = with_masked_copy(model, micro)
    lp_both = response_logprobs(model, ids, am, pos, pv, grid, t, cfg.logprob_chunk)
    b = micro.input_ids.shape[0]
    return lp_both[:b], lp_both[b:]
  pv, grid = micro.images()
  lp = response_logprobs(model, micro.input_ids, micro.attention_mask, micro.position_ids, pv, grid, t,
                         cfg.logprob_chunk)
  return lp, None


def micro_logprobs_and_full_kl(cfg: StepConfig, model, micro: TrainBatch) -> tuple[Array, Array, Array]:
  """(original, masked-image log-probs, full-distribution KL(original || masked)) [B, T] of one
  micro-batch from one [original ; masked] forward; logits are formed ``logprob_chunk`` tokens at a time."""
  from papo_jax.rl import vppo
  t, b = micro.response_mask.shape[-1], micro.input_ids.shape[0]
  ids, am, pos, pv, grid = with_masked_copy(model, micro)
  h = response_hidden(model, ids, am, pos, pv, grid, t)
  lp_both = chunked_token_logprobs(model, h, ids[:, ids.shape[1] - t:], cfg.logprob_chunk)
  kl = vppo.full_kl_chunked(lambda x: model.logits(x, dtype=jnp.float32), h[:b], h[b:], cfg.logprob_chunk)
  return lp_both[:b], lp_both[b:], kl


def masked_image_logp(cfg: StepConfig, model, micro: TrainBatch) -> Array:
  """Policy log-probs on the masked images (same tokens and positions as the original)."""
  pv, grid = micro.images(masked=True)
  return response_logprobs(model, micro.input_ids, micro.attention_mask, micro.position_ids, pv, grid,
                           micro.response_mask.shape[-1], cfg.logprob_chunk)


# The masked path, decided once (``masked_path``), when ``cfg.needs_mask``:
#
#   mask_grad | micro.mask_logp | masked log-probs come from
#   ----------+-----------------+---------------------------------------------------------------
#   False     | given           | the batch (precomputed by the log-prob pass): no forward
#   False     | None            | a forward-only pass outside the differentiated function, so the
#             |                 | backward runs on the original half alone (the paper: PAPO costs
#             |                 | one extra forward over GRPO)
#   True      | either          | the policy on [original ; masked] inside the differentiated
#             |                 | function: the gradient flows through both halves
#
# Without ``needs_mask`` there is no masked path (GRPO): masked pixels are never read.


def masked_path(cfg: StepConfig, micro: TrainBatch) -> str:
  """``none`` | ``given`` | ``forward`` | ``joint`` (the table above)."""
  if not cfg.needs_mask:
    return "none"
  if cfg.mask_grad:
    return "joint"
  return "given" if micro.mask_logp is not None else "forward"


# -- the step -------------------------------------------------------------------------------


def whole_batch_factors(cfg: StepConfig, batch: TrainBatch) -> dict[str, Array]:
  """``losses.sequence_factors`` over all [M, B] rows of the update ({} when the loss takes none).

  Normalising per micro-batch would make the update depend on the micro-batch size, so
  the factors come from the precomputed log-probs of the whole batch, no gradient.
  """
  if not cfg.loss.needs_sequence_factors:
    return {}
  if batch.old_logp is None or batch.mask_logp is None:
    missing = [k for k in ("old_logp", "mask_logp") if getattr(batch, k) is None]
    raise ValueError(
        f"train step: VPPO's advantage scale / adaptive gamma are normalised over the whole update batch "
        f"and need its precomputed old and masked-image log-probs, but the batch has no {' or '.join(missing)}; "
        "run make_logprob_pass first (StepConfig.needs_logprob_pass)")
  return jax.lax.stop_gradient(sequence_factors(cfg.loss, batch.old_logp, batch.mask_logp, batch.response_mask,
                                                batch.dependency))


def make_grad_fn(graphdef, cfg: StepConfig) -> Callable:
  """``grad_fn(params, ref_params, batch, gamma, entropy_scale) -> (grads, loss, metrics)``.

  Gradients are accumulated over the micro-batch axis with ``lax.scan``; each
  micro-batch's loss is weighted by its share of response tokens (sequences for
  'seq_mean_token_mean'), and per-sequence factors are normalised over all M x B rows
  before the scan, so the result equals the whole batch's.
  """

  def micro_loss(params, ref_params, micro: TrainBatch, weight, gamma, entropy_scale, factors):
    model = nnx.merge(graphdef, params)
    path = masked_path(cfg, micro)
    lp, lp_mask = micro_logprobs(cfg, model, micro, with_mask=path == "joint")
    if path in ("given", "forward"):
      lp_mask = jax.lax.stop_gradient(micro.mask_logp)
    lp_ref = None
    if cfg.needs_ref:
      if micro.ref_logp is not None:
        lp_ref = micro.ref_logp
      else:
        ref = nnx.merge(graphdef, ref_params)
        lp_ref = jax.lax.stop_gradient(micro_logprobs(cfg, ref, micro, with_mask=False)[0])
    lp_old = jax.lax.stop_gradient(lp) if micro.old_logp is None else micro.old_logp
    loss, metrics = papo_loss(lp, lp_old, lp_ref, lp_mask, micro.advantages, micro.response_mask, cfg.loss,
                              gamma=gamma, entropy_scale=entropy_scale, adv_scale_B=factors.get("adv_scale"),
                              gamma_factor_B=factors.get("gamma_factor"), dependency_BxT=micro.dependency)
    return loss * weight, jax.tree.map(lambda m: m * weight, metrics)

  value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

  def grad_fn(params, ref_params, batch: TrainBatch, gamma=None, entropy_scale=1.0):
    gamma = cfg.loss.gamma if gamma is None else gamma
    m = batch.response_mask.astype(jnp.float32)
    if cfg.loss.agg == "token":
      share = m.sum(axis=(1, 2)) / jnp.maximum(m.sum(), 1.0)
    else:
      rows = (m.sum(-1) > 0).astype(jnp.float32)
      share = rows.sum(-1) / jnp.maximum(rows.sum(), 1.0)
    factors = whole_batch_factors(cfg, batch)   # {name: [M, B]}

    def body(carry, i):
      g_acc, l_acc = carry
      micro = _micro(batch, i)
      if masked_path(cfg, micro) == "forward":
        micro = micro.replace(mask_logp=jax.lax.stop_gradient(
            masked_image_logp(cfg, nnx.merge(graphdef, params), micro)))
      (loss, metrics), g = value_and_grad(params, ref_params, micro, share[i], gamma, entropy_scale,
                                          jax.tree.map(lambda a: a[i], factors))
      # Metrics leave the scan stacked per micro-batch (no initial value, so no extra trace).
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss), metrics

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    (grads, loss), metrics_M = jax.lax.scan(body, init, jnp.arange(batch.input_ids.shape[0]))
    return grads, loss, jax.tree.map(lambda a: jnp.sum(a, axis=0), metrics_M)

  return grad_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig) -> Callable:
  """Returns ``step(state, ref_params, batch, gamma, entropy_scale) -> (state, metrics)`` (jit it).

  ``ref_params`` may be None when the loss has no reference KL or the batch carries
  precomputed ``ref_logp``. ``gamma``/``entropy_scale`` are scalars (annealing without
  recompiling). A step whose gradient norm or loss is not finite leaves params and
  optimizer state untouched and reports ``actor/skipped_nonfinite`` = 1.
  """
  grad_fn = make_grad_fn(graphdef, cfg)

  def step(state: TrainState, ref_params, batch: TrainBatch, gamma=None, entropy_scale=1.0):
    grads, loss, metrics = grad_fn(state.params, ref_params, batch, gamma, entropy_scale)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + finite.astype(jnp.int32), params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state))
    metrics = dict(metrics)
    metrics.update({"actor/grad_norm": grad_norm, "actor/skipped_nonfinite": (~finite).astype(jnp.float32),
                    "actor/loss_total": loss})
    return new_state, metrics

  return step


def make_logprob_pass(graphdef, cfg: StepConfig) -> Callable:
  """``fn(params, ref_params, batch) -> (old_logp, mask_logp | None, ref_logp | None, dependency | None)``
  [M, B, T], no gradient.

  The one fused no-grad pass that precedes several mini-batch updates per step, or the
  update whose loss takes whole-batch sequence factors (``StepConfig.needs_logprob_pass``).
  ``dependency``: the full-distribution visual dependency when ``vppo_dependency='full_kl'``
  (the loss reads it in place of VPPO's k3 estimate from the two log-probs).
  """
  def fn(params, ref_params, batch: TrainBatch):
    def one(i):
      micro = _micro(batch, i)
      model = nnx.merge(graphdef, params)
      dep = None
      if cfg.full_kl_dependency:
        lp, lp_mask, dep = micro_logprobs_and_full_kl(cfg, model, micro)
      else:
        lp, lp_mask = micro_logprobs(cfg, model, micro, with_mask=cfg.needs_mask)
      lp_ref = None
      if cfg.needs_ref:
        lp_ref = micro_logprobs(cfg, nnx.merge(graphdef, ref_params), micro, with_mask=False)[0]
      return lp, lp_mask, lp_ref, dep
    return jax.lax.stop_gradient(jax.lax.map(one, jnp.arange(batch.input_ids.shape[0])))

  return fn
