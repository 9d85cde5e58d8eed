"""Several processes (TPU pod hosts, GPU nodes): host data in, global arrays, host data out.

The trainer keeps one rule: every process holds the same *global* host-side batch. Each
process reads its own data shard; :func:`allgather_objects` exchanges the local batches so
all processes build the same global batch (the vision tower runs over all images anyway),
device inputs become global arrays with :func:`global_array` (each process supplies the
shards its devices hold), and device outputs come back whole with :func:`to_host`. With
one process all three are plain local operations.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from papo_jax.parallel.sharding import DEFAULT_RULES, _fit_spec, logical_to_mesh_spec


def process_count() -> int:
  return jax.process_count()


def allgather_objects(obj: Any) -> list[Any]:
  """[obj of process 0, obj of process 1, ...] on every process (picklable objects)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  everything = multihost_utils.process_allgather(padded)              # [P, max]
  return [pickle.loads(everything[p, :int(sizes[p][0])].tobytes()) for p in range(everything.shape[0])]


def global_array(x: np.ndarray, mesh: Mesh, names: Sequence[str | None] | None = None, rules=DEFAULT_RULES):
  """A global jax.Array from a host array every process holds whole, sharded by logical ``names``."""
  x = np.asarray(x)
  spec = _fit_spec(logical_to_mesh_spec(names, rules, mesh), x.shape, mesh) if names else jax.sharding.PartitionSpec()
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def to_host(tree):
  """numpy copies of (possibly multi-process) arrays, whole on every process."""
  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)
