"""Building blocks shared by the vision tower and the decoder (HF's numerics, logical axes)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from papo_jax.parallel.sharding import constrain_gathered, current_mesh_rules

_INIT_STD = 0.02


def param(rngs: nnx.Rngs | None, shape: Sequence[int], dtype, axes: Sequence[str | None], init: str = "normal") -> nnx.Param:
  """A parameter carrying its logical axis names (see papo_jax.parallel)."""
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


def gathered_at(w: jax.Array, x: jax.Array, names: Sequence[str | None]) -> tuple[jax.Array, jax.Array]:
  """(``w`` gathered over the FSDP axes, ``x``): an explicit all-gather of a weight already in the
  compute dtype (logical axes ``names``), issued only once its layer's input ``x`` exists.

  The optimisation barrier ties the gather to ``x``. Without it the TPU compiler gathers every
  layer's weights (or allocates every layer's collective-matmul output) at the top of the
  micro-batch and shares one gather between the forward and the rematerialised backward, so all
  layers' gathered weights are live at the step's peak. Identity outside a mesh
  (:func:`papo_jax.parallel.use_mesh_rules`).
  """
  if current_mesh_rules() is None:
    return w, x
  w, x = jax.lax.optimization_barrier((w, x))
  return constrain_gathered(w, names), x


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out] (HF's weight transposed).

  ``gather``: under a mesh, the kernel is cast to the compute dtype, then gathered over the FSDP
  axes at the call (:func:`gathered_at`) instead of being left to the partitioner (the decoder's
  layers).
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple[str | None, str | None],
               dtype, param_dtype, rngs: nnx.Rngs, gather: bool = False):
    self.kernel = param(rngs, (in_features, out_features), param_dtype, axes)
    self.bias = param(rngs, (out_features,), param_dtype, (axes[1],), init="zeros") if use_bias else None
    self.dtype = dtype
    self.gather, self.axes = gather, tuple(axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel.get_value().astype(self.dtype)
    if self.gather:
      w, x = gathered_at(w, x, self.axes)
    y = jnp.dot(x.astype(self.dtype), w)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """HF RMSNorm: normalise in float32, cast back to the input dtype, *then* scale."""

  def __init__(self, dim: int, *, eps: float, param_dtype, axis_name: str = "norm"):
    self.weight = param(None, (dim,), param_dtype, (axis_name,), init="ones")
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    y = y.astype(x.dtype)
    return self.weight.get_value().astype(x.dtype) * y


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """NeoX-style rotation (pairs i and i + d/2); cos/sin broadcast against x."""
  return x * cos + rotate_half(x) * sin


NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def softmax_attention(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_BxLxS: jax.Array,
                      scale: float) -> jax.Array:
  """Masked softmax attention with grouped KV heads; softmax in float32.

  Rows whose keys are all masked get uniform weights (finite, like HF) instead of NaN.
  Returns [B, L, H, D] in q's dtype.
  """
  b, l, h, d = q_BxLxHxD.shape
  kvh = k_BxSxKxD.shape[2]
  q = q_BxLxHxD.reshape(b, l, kvh, h // kvh, d)
  scores = jnp.einsum("blkgd,bskd->bkgls", q, k_BxSxKxD, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask_BxLxS[:, None, None, :, :], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxD.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxD)
  return out.reshape(b, l, h, d)


# -- rematerialisation ----------------------------------------------------------------------

# Policy names accepted by ``ModelConfig.remat`` -> what the backward pass may keep from the
# forward of one decoder layer / vision block (None: keep nothing, recompute the whole block).
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def resolve_remat(remat) -> tuple[str, str]:
  """``ModelConfig.remat`` -> (decoder-layer policy, vision-block policy), each ``none`` or a
  key of :data:`REMAT_POLICIES`.

  Accepted: ``True``/``False`` (``full``/``none`` for both, as before), one policy name for
  both (``"dots_saveable"``), or ``"text=<policy>,vision=<policy>"`` (either part may be
  omitted; an omitted part is ``none``).
  """
  if remat is None or remat is False:
    return "none", "none"
  if remat is True:
    return "full", "full"
  if not isinstance(remat, str):
    raise ValueError(f"model.remat: expected a bool or a policy string, got {remat!r}")
  known = ("none",) + tuple(REMAT_POLICIES)
  if "=" not in remat:
    parts = {"text": remat.strip(), "vision": remat.strip()}
  else:
    parts = {"text": "none", "vision": "none"}
    for item in remat.split(","):
      key, _, value = item.partition("=")
      if key.strip() not in parts:
        raise ValueError(f"model.remat: {key.strip()!r} in {remat!r} is not 'text' or 'vision'")
      parts[key.strip()] = value.strip()
  for key, value in parts.items():
    if value not in known:
      raise ValueError(f"model.remat: {key} policy {value!r} is not one of {', '.join(known)}")
  return parts["text"], parts["vision"]


def remat_call(policy: str, fn, module: nnx.Module, *args):
  """``fn(module, *args)``, rematerialised in the backward pass under ``policy``.

  A functional checkpoint: the module is split into (graphdef, state) and merged again
  inside ``jax.checkpoint``, so it works wherever the module itself was merged inside
  traced code (a ``lax.scan``/``lax.map`` body, ``eval_shape``). ``args`` are pytrees of
  arrays; anything else ``fn`` needs is closed over. ``fn`` must not mutate the module.
  """
  if policy == "none":
    return fn(module, *args)
  graphdef, state = nnx.split(module)

  def pure(state_, *args_):
    return fn(nnx.merge(graphdef, state_), *args_)

  return jax.checkpoint(pure, policy=REMAT_POLICIES[policy])(state, *args)
