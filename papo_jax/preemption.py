"""Stop a run cleanly on SIGTERM (spot/preemptible VMs, maintenance events) or SIGINT.

The step loop polls a :class:`PreemptionGuard` after every step; once it says stop, the
loop saves a checkpoint and exits 0, and a rerun resumes from that step::

    with PreemptionGuard() as guard:
      for step in range(start, steps):
        state = train_step(state, ...)
        if guard.should_stop(step):
          save_checkpoint(step + 1, state); logging.info(guard.stop_message(step)); break

Every host must stop after the same step, or the hosts would wait for each other inside
the checkpoint's collectives forever. How they agree depends on the run:

* one process: the local signal flag is the answer;
* several processes with JAX's preemption service (on by default after
  ``jax.distributed.initialize``): the service owns SIGTERM, spreads the notice to all hosts
  and ``multihost_utils.reached_preemption_sync_point`` names one common step; SIGINT is
  caught here and agreed like the next case;
* several processes without that service: the flag is all-gathered every ``sync_every``
  steps and any host's signal stops them all.
"""

from __future__ import annotations

import signal
import threading

from absl import logging

LOCAL, JAX_SERVICE, ALLGATHER = "local", "jax_service", "allgather"


def _jax_preemption_service_active() -> bool:
  """True after ``jax.distributed.initialize`` started JAX's preemption sync manager."""
  try:
    from jax._src import distributed
  except ImportError:                 # a JAX without the private module: fall back to the all-gather
    return False
  state = distributed.global_state
  return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


def _any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any (a tiny all-gather; a collective: all must call)."""
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


class PreemptionGuard:
  """Records SIGTERM/SIGINT and tells the step loop, identically on every host, when to stop.

  ``requested``: a signal reached this process. ``should_stop(step)``: the agreed answer,
  to be called by every process after every step with the same ``step``. Installing the
  handlers happens in ``__enter__`` (or :meth:`install`) and only from the main thread;
  ``__exit__``/:meth:`restore` puts the previous handlers back.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), *, mode: str | None = None, sync_every: int = 1,
               process_count: int | None = None):
    if sync_every < 1:
      raise ValueError(f"sync_every: must be >= 1, got {sync_every}")
    if process_count is None:
      import jax
      process_count = jax.process_count()
    if mode is None:
      mode = LOCAL if process_count == 1 else JAX_SERVICE if _jax_preemption_service_active() else ALLGATHER
    if mode not in (LOCAL, JAX_SERVICE, ALLGATHER):
      raise ValueError(f"mode: {mode!r} is not one of {LOCAL}|{JAX_SERVICE}|{ALLGATHER}")
    self.mode = mode
    self.sync_every = sync_every
    # JAX's service installed its own SIGTERM handler; replacing it would hide the notice from the other hosts.
    self.signals = tuple(s for s in signals if not (mode == JAX_SERVICE and s == signal.SIGTERM))
    self.signal_name: str | None = None
    self._event = threading.Event()
    self._previous = {}
    self._stopped_at: int | None = None
    self._service_fired = False

  # ------------------------------------------------------------------ handlers
  def _handle(self, signum, frame):
    del frame
    if self._event.is_set() and signum == signal.SIGINT:
      # A second Ctrl-C: the user does not want to wait for the checkpoint.
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    self._event.set()
    logging.warning("%s received: the run stops after the current step and saves a checkpoint", self.signal_name)

  def install(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionGuard.install: signal handlers can only be installed from the main thread")
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def restore(self) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.restore()
    return False

  # ------------------------------------------------------------------ polling
  @property
  def requested(self) -> bool:
    """A stop signal reached this process (or JAX's service reported a preemption)."""
    return self._event.is_set() or self._service_fired

  def request(self, why: str = "request") -> None:
    """Asks for a stop as a signal would (tests, or a wall-clock budget)."""
    self.signal_name = why
    self._event.set()

  def should_stop(self, step: int) -> bool:
    """Whether every process stops after ``step``; call it on every process after every step."""
    if self._stopped_at is not None:
      return True
    if self.mode == LOCAL:
      stop = self._event.is_set()
    elif self.mode == JAX_SERVICE:
      from jax.experimental import multihost_utils
      # The service's sync point must be asked at every step by every host; SIGINT rides on the all-gather.
      fired = multihost_utils.reached_preemption_sync_point(step)
      if fired and not self._service_fired:
        self._service_fired, self.signal_name = True, self.signal_name or "SIGTERM"
      stop = fired or (step % self.sync_every == 0 and _any_process(self._event.is_set()))
    else:
      stop = step % self.sync_every == 0 and _any_process(self._event.is_set())
    if stop:
      self._stopped_at = step
      self.signal_name = self.signal_name or "a signal on another host"
    return stop

  def stop_message(self, step: int, checkpoint_step: int | None = None) -> str:
    """The log line of a clean stop."""
    saved = step + 1 if checkpoint_step is None else checkpoint_step
    return (f"stopping after step {step} on {self.signal_name}: checkpoint at step {saved} written; "
            f"rerun the same command to resume")
