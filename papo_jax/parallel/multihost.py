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


def start_distributed() -> None:
  """Joins the other processes of a multi-host run (TPU pods and clusters are auto-detected).

  ``PAPO_DISTRIBUTED=1`` asks for it; ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
  ``JAX_PROCESS_ID`` give the processes explicitly (any platform, CPU included).
  """
  import os
  from absl import logging
  env = os.environ
  if not (env.get("PAPO_DISTRIBUTED") or int(env.get("JAX_NUM_PROCESSES", "1")) > 1):
    return
  if jax.distributed.is_initialized():
    return
  kw = {}
  if env.get("JAX_NUM_PROCESSES"):
    kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=int(env["JAX_NUM_PROCESSES"]),
              process_id=int(env["JAX_PROCESS_ID"]))
    if jax.config.jax_platforms in (None, "", "cpu") and "cpu" in (env.get("JAX_PLATFORMS") or "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)
  logging.info("process %d of %d", jax.process_index(), jax.process_count())


def first_process_then_sync(fn, tag: str):
  """``fn()`` on process 0 only (e.g. writing a shared file); every process waits until it is done."""
  out = fn() if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)
  return out


class GlobalBatches:
  """This process's data shard, joined with the other processes' into one global batch.

  Every process reads only its own records; each ``next`` exchanges the local batches
  so all processes hold the same global PromptBatch (one process: the local batch).
  ``get_state``/``set_state`` are this process's own position.
  """

  def __init__(self, local_iterator, pad_id: int):
    self.local, self.pad_id = local_iterator, pad_id

  def __iter__(self):
    return self

  def __next__(self):
    from papo_jax.data.pipeline import concat_batches
    return concat_batches(allgather_objects(next(self.local)), self.pad_id)

  def __getattr__(self, name):   # processor, get_state, set_state, close, ...
    return getattr(self.local, name)


def global_train_arrays(arrays: dict, mesh: Mesh) -> dict:
  """Host arrays of a TrainBatch (the same on every process) -> global device arrays.

  Every field's axis 1 is sharded over the batch axes: the rows [M, b, ...] and, in the
  per-shard image layout (``row_image_start`` present; ``assemble_train_batch(shards=
  batch_shards(mesh))``), the images [M, S, ...] that those rows read, so each device holds
  and encodes only its own rows' images. The older per-micro-batch image list [M, N, ...]
  is consumed by the vision tower whole and stays replicated.
  """
  whole = () if "row_image_start" in arrays else ("pixel_values", "masked_pixel_values", "image_grid_thw")
  return {k: global_array(v, mesh, None if k in whole else (None, "batch")) for k, v in arrays.items()}


def pinned_shardings(tree, mesh: Mesh):
  """Each leaf's current sharding, with single-device leaves replicated over ``mesh``."""
  from jax.sharding import PartitionSpec
  def sh(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) else NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(sh, tree)
