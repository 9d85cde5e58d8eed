"""Training checkpoints: the train state, each process's data position and, when it is not the
initial model, the frozen reference policy.

Layout (orbax, one directory per step under ``checkpoint.dir`` or ``<workdir>/checkpoints``):
``state`` (TrainState: step, params, optimizer state), ``meta`` (JSON: the data position
of process 0 and of every process, the step, whether ``ref`` is saved, the KL_prcp monitor's
state) and ``ref`` (the
reference parameters, saved when a format warm-up made them differ from the checkpoint
the run started from).

Where: a local directory or ``gs://`` (orbax writes both natively). A workdir on another
fsspec scheme (``memory://``, ``s3://``, ...) keeps its records there but needs
``checkpoint.dir`` set to a local or ``gs://`` path: orbax cannot write those schemes, and a
local staging copy mirrored to the URL would be lost with the VM between syncs, which is the
failure the URL workdir exists to avoid.
"""

from __future__ import annotations

import jax
from absl import logging

from papo_jax.config_base import ConfigError, checkpoint_dir
from papo_jax.parallel import allgather_objects


def checked_checkpoint_dir(c, workdir: str) -> str:
  """The run's checkpoint directory; a clear error when orbax cannot write it."""
  d = checkpoint_dir(c, workdir)
  if "://" in d and not d.startswith(("gs://", "file://")):
    where = "checkpoint.dir" if c.checkpoint.get("dir") else "checkpoint.dir (unset: <workdir>/checkpoints)"
    raise ConfigError(f"{where}: {d!r} is neither a local path nor gs://, the only places orbax writes "
                      f"checkpoints; set checkpoint.dir to a local directory or a gs:// URL")
  return d[len("file://"):] if d.startswith("file://") else d


class Checkpoints:
  """Saves and restores one run's steps (asynchronously; :meth:`close` waits for the last save)."""

  def __init__(self, c, workdir: str):
    import orbax.checkpoint as ocp
    self.ocp = ocp
    self.dir = checked_checkpoint_dir(c, workdir)
    self.mngr = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=c.checkpoint.keep, enable_async_checkpointing=True))
    self.restored_monitor: dict | None = None   # the monitor state of the step restore() read

  def latest_step(self) -> int:
    """The last saved step, 0 when there is none."""
    return self.mngr.latest_step() or 0

  def save(self, step: int, state, data_iterator, ref_params=None, monitor_state: dict | None = None) -> None:
    """``monitor_state``: :meth:`metrics.Monitor.state` (γ halvings and recent metrics), so a
    resumed run lowers γ and warns exactly as the uninterrupted one."""
    ocp = self.ocp
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({
        "data": data_iterator.get_state(), "data_per_process": allgather_objects(data_iterator.get_state()),
        "step": step, "ref": ref_params is not None, "monitor": monitor_state}))
    if ref_params is not None:
      items["ref"] = ocp.args.StandardSave(ref_params)
    self.mngr.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, state, data_iterator, ref_params=None):
    """(state, ref_params) of ``step``; the data iterator is moved to its saved position.

    ``ref_params``: the reference the run would use without a saved one (its shapes and
    shardings are the template); returned unchanged when the checkpoint holds none.
    """
    ocp = self.ocp
    meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    self.restored_monitor = meta.get("monitor")
    items = dict(state=ocp.args.StandardRestore(state))
    if ref_params is not None and meta.get("ref"):
      items["ref"] = ocp.args.StandardRestore(ref_params)
    restored = self.mngr.restore(step, args=ocp.args.Composite(**items))
    per_process = meta.get("data_per_process")
    data_iterator.set_state(per_process[jax.process_index()] if per_process else meta["data"])
    logging.info("resumed from step %d in %s", step, self.dir)
    return restored.state, (restored.ref if "ref" in items else ref_params)

  def wait(self) -> None:
    """Returns once the last save is fully written."""
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()


def open_run(c, workdir: str) -> tuple[Checkpoints, int]:
  """Creates the workdir (local or URL), writes the run's config there and returns its
  checkpoints and the step to start from (the last saved one, 0 for a new run)."""
  import jax
  from papo_jax import workdir as workdir_lib
  workdir_lib.makedirs(workdir)
  name = "config.json" if jax.process_index() == 0 else f"config.process{jax.process_index()}.json"
  workdir_lib.write_text(workdir_lib.join(workdir, name), c.to_json_best_effort(indent=2))
  ckpts = Checkpoints(c, workdir)
  return ckpts, ckpts.latest_step()


def finished_run(c, workdir: str, ckpts: Checkpoints) -> dict:
  """A rerun of a run that already did all its steps: says so (and marks it done); its last metrics row."""
  import jax
  from papo_jax import metrics as metrics_lib
  from papo_jax import workdir as workdir_lib
  rows = workdir_lib.read_jsonl(workdir_lib.join(workdir, "metrics.jsonl"))
  if jax.process_index() == 0 and not workdir_lib.is_done(workdir):
    workdir_lib.mark_done(workdir, c.train.steps)
  logging.info("%s", metrics_lib.summary(workdir=workdir, ckpt_dir=ckpts.dir, steps_done=0,
                                         total_steps=c.train.steps, seconds=0.0, rows=rows))
  return rows[-1] if rows else {}
