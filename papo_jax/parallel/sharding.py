"""One mesh, logical axis names, and the rules that map one to the other.

Parameters carry logical axis names in their metadata (``logical_axes``, e.g.
``('embed', 'mlp')``); activations are constrained with :func:`constrain`. The
rules (logical name -> mesh axis or axes) come from the run config, so the same
model shards as FSDP, tensor-parallel or pure data-parallel without code changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("cache_length", None),
    ("patch", None),
    ("norm", None),
)


def make_rules(overrides: Iterable[tuple[str, Any]] | None = None,
               base: tuple[tuple[str, Any], ...] = DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
  """Sharding rules from a config: ``base`` (today's :data:`DEFAULT_RULES`) with each
  ``(logical name, mesh axis | tuple of axes | None)`` of ``overrides`` replacing or adding
  its entry. Pass the result as ``rules`` to :func:`shard_state` / :func:`use_mesh_rules`."""
  table = dict(base)
  for name, axes in overrides or ():
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes,) if isinstance(axes, str) else (axes or ()):
      if a not in MESH_AXES:
        raise ValueError(f"mesh.rules: {name!r} maps to {a!r}, not one of {MESH_AXES}")
    table[name] = axes
  return tuple(table.items())


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh; one size may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by fixed axes product {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} "
        f"but {len(devices)} devices are present")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def batch_shards(mesh: Mesh | None, rules=DEFAULT_RULES) -> int:
  """How many ways the ``batch`` logical axis splits on ``mesh`` (1 without a mesh): the
  ``shards`` of :func:`papo_jax.rl.batching.assemble_train_batch`."""
  if mesh is None:
    return 1
  axes = _rules_dict(rules).get("batch")
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def _rules_dict(rules: Iterable[tuple[str, Any]]) -> dict[str, Any]:
  return {name: axes for name, axes in rules}


def logical_to_mesh_spec(names: Sequence[str | None] | None, rules=DEFAULT_RULES, mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once.

  Axes of size 1 in ``mesh`` are dropped so specs stay valid for any mesh shape.
  """
  if names is None:
    return PartitionSpec()
  table = _rules_dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def _logical_axes(var: nnx.Variable):
  return var.get_metadata().get("logical_axes")


def logical_partition_spec(state, rules=DEFAULT_RULES, mesh: Mesh | None = None):
  """PartitionSpec tree for an nnx State whose Variables carry ``logical_axes``."""
  def spec(x):
    if isinstance(x, nnx.Variable):
      names = _logical_axes(x)
      return logical_to_mesh_spec(names, rules, mesh)
    return PartitionSpec()
  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide the dimension they shard (e.g. tiny test models)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    tup = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    size = 1
    for a in tup:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding tree (same structure as ``state``) from logical axes and rules."""
  def sharding(x):
    if isinstance(x, nnx.Variable):
      names = _logical_axes(x)
      value = x.get_value()
      spec = _fit_spec(logical_to_mesh_spec(names, rules, mesh), value.shape, mesh)
      return NamedSharding(mesh, spec)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state, mesh: Mesh, rules=DEFAULT_RULES):
  """Places every array of an nnx State on ``mesh`` according to its logical axes."""
  shardings = state_shardings(state, mesh, rules)
  def put(x, s):
    if isinstance(x, nnx.Variable):
      return x.replace(jax.device_put(x.get_value(), s))
    return jax.device_put(x, s)
  return jax.tree.map(put, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


# Activation constraints ---------------------------------------------------------

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Any] | None] = contextvars.ContextVar("papo_mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Within this context, :func:`constrain` pins activations to ``mesh`` by ``rules``."""
  token = _CONTEXT.set(None if mesh is None else (mesh, rules))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def current_mesh_rules() -> tuple[Mesh, Any] | None:
  """(mesh, rules) of the enclosing :func:`use_mesh_rules`, or None."""
  return _CONTEXT.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside :func:`use_mesh_rules`."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = _fit_spec(logical_to_mesh_spec(names, rules, mesh), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_gathered(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``x`` pinned to its logical sharding less the ``data`` / ``fsdp`` axes: an FSDP weight
  gathered whole on every device (tensor-parallel axes kept). A no-op outside
  :func:`use_mesh_rules`."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = _fit_spec(logical_to_mesh_spec(names, rules, mesh), x.shape, mesh)
  kept = []
  for axes in spec:
    tup = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    tup = tuple(a for a in tup if a not in ("data", "fsdp"))
    kept.append(None if not tup else tup[0] if len(tup) == 1 else tup)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*kept)))


def constrain_split(x: jax.Array, dim: int) -> jax.Array:
  """``x`` split along ``dim`` over the batch mesh axes (``data`` x ``fsdp``), whole along the
  others. A no-op outside :func:`use_mesh_rules`."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  names = [None] * x.ndim
  names[dim] = "batch"
  spec = _fit_spec(logical_to_mesh_spec(names, rules, mesh), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
