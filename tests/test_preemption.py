"""SIGTERM/SIGINT stop the step loop after a step, on every host at the same step, with exit 0."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from papo_jax import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for the trainer's loop: one line per finished step, a "checkpoint" on stop.
LOOP = r"""
import os, sys, time
from absl import logging
out, steps, mode = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None) or None
if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                             int(os.environ["JAX_PROCESS_ID"]))
from papo_jax.preemption import PreemptionGuard
with PreemptionGuard(mode=mode) as guard:
  print("mode", guard.mode, flush=True)
  for step in range(steps):
    time.sleep(0.1)                                    # the step's work
    with open(out, "a") as f:
      f.write(f"{step}\n")
    if guard.should_stop(step):
      with open(out + ".ckpt", "w") as f:
        f.write(str(step + 1))
      print(guard.stop_message(step), flush=True)
      sys.exit(0)
sys.exit(3)                                             # ran to the end: the signal was lost
"""


def _script(tmp_path):
  p = tmp_path / "loop.py"
  p.write_text(LOOP)
  return str(p)


def _wait_for_lines(path, n, procs, timeout=120):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if os.path.exists(path) and len(open(path).read().split()) >= n:
      return
    for p in procs:
      if p.poll() is not None:
        raise AssertionError(f"exited early: {p.communicate()}")
    time.sleep(0.05)
  raise AssertionError(f"{path} never reached {n} steps")


def test_signal_sets_the_flag_and_handlers_are_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard(process_count=1) as guard:
    assert guard.mode == preemption.LOCAL
    assert not guard.requested and not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested and guard.should_stop(1)
    assert guard.should_stop(2)                               # stays stopped
    msg = guard.stop_message(1)
    assert "SIGTERM" in msg and "step 1" in msg and "checkpoint at step 2" in msg
  assert signal.getsignal(signal.SIGTERM) is before
  with pytest.raises(ValueError, match="mode"):
    preemption.PreemptionGuard(mode="sometimes", process_count=1)


def test_sigterm_ends_a_single_process_loop_cleanly(tmp_path):
  out = str(tmp_path / "steps")
  env = dict(os.environ, PYTHONPATH=ROOT)
  p = subprocess.Popen([sys.executable, _script(tmp_path), out, "1000"], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  _wait_for_lines(out, 3, [p])
  p.send_signal(signal.SIGTERM)
  log, _ = p.communicate(timeout=60)
  assert p.returncode == 0, log
  done = [int(s) for s in open(out).read().split()]
  assert done == list(range(len(done))) and 3 <= len(done) < 1000
  assert open(out + ".ckpt").read() == str(done[-1] + 1)     # the checkpoint follows the last finished step
  assert f"stopping after step {done[-1]} on SIGTERM" in log and "mode local" in log


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("sig,mode,expect_mode", [(signal.SIGTERM, None, "jax_service"),
                                                  pytest.param(signal.SIGINT, None, "jax_service",
                                                               marks=pytest.mark.slow),
                                                  (signal.SIGTERM, "allgather", "allgather")])
def test_a_signal_on_one_host_stops_both_hosts_at_the_same_step(tmp_path, sig, mode, expect_mode):
  """Two CPU processes; only process 1 gets the signal; both stop after one common step and exit 0."""
  port = _free_port()
  procs, outs = [], []
  for pid in range(2):
    out = str(tmp_path / f"steps{pid}")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
    procs.append(subprocess.Popen([sys.executable, _script(tmp_path), out, "1000", mode or ""], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs.append(out)
  try:
    _wait_for_lines(outs[1], 3, procs)
    procs[1].send_signal(sig)
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log
    assert f"mode {expect_mode}" in log, log
  done = [[int(s) for s in open(o).read().split()] for o in outs]
  assert done[0] == done[1] and len(done[0]) < 1000, done               # the same last step on both hosts
  assert open(outs[0] + ".ckpt").read() == open(outs[1] + ".ckpt").read() == str(done[0][-1] + 1)
