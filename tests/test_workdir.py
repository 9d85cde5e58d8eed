"""Workdir helpers on fsspec's memory:// (standing in for gs://) and on a local disk."""

import json
import os
import struct
import uuid

import fsspec
import pytest

from papo_jax import workdir as W


@pytest.fixture
def url():
  base = f"memory://bucket-{uuid.uuid4().hex[:8]}/run"
  yield base
  fs = fsspec.filesystem("memory")
  if fs.exists(base.split("://")[1]):
    fs.rm(base.split("://")[1], recursive=True)


@pytest.fixture(params=["memory", "local"])
def root(request, tmp_path, url):
  return url if request.param == "memory" else str(tmp_path / "run")


def _steps(path):
  return [json.loads(l)["step"] for l in W.read_text(path).splitlines()]


def test_paths_and_text(root):
  W.makedirs(W.join(root, "tb"))
  assert W.exists(W.join(root, "tb"))
  cfg = W.join(root, "config.json")
  assert not W.exists(cfg)
  W.write_text(cfg, '{"a": 1}')
  assert W.exists(cfg) and json.loads(W.read_text(cfg)) == {"a": 1}
  W.write_text(cfg, '{"a": 2}')                  # rewritten whole
  assert json.loads(W.read_text(cfg)) == {"a": 2}
  assert W.join("memory://b/run", "x.json") == "memory://b/run/x.json"


def test_jsonl_log_appends_and_a_resume_drops_the_recomputed_steps(root):
  path = W.join(root, "metrics.jsonl")
  with W.JsonlLog(path, flush_every_s=0.0) as log:
    for s in range(1, 9):
      log.write({"step": s, "loss": float(s)})
  assert _steps(path) == list(range(1, 9))
  # Killed after step 8; the checkpoint is at step 5: steps 6..8 will be recomputed.
  with W.JsonlLog(path, resume_step=5, flush_every_s=0.0) as log:
    assert _steps(path) == [1, 2, 3, 4, 5]
    log.write({"step": 6, "loss": 60.0})
  assert _steps(path) == [1, 2, 3, 4, 5, 6]
  assert json.loads(W.read_text(path).splitlines()[-1])["loss"] == 60.0


def test_remote_log_buffers_until_flush_or_close(url):
  path = W.join(url, "samples.jsonl")
  log = W.JsonlLog(path, flush_every_s=3600.0)
  log.write({"step": 1})
  log.write({"step": 2})
  assert not W.exists(path)                        # buffered: object stores have no append
  log.flush()
  assert _steps(path) == [1, 2]
  log.write({"step": 3})
  log.close()
  assert _steps(path) == [1, 2, 3]


def test_truncate_drops_a_cut_line_and_tolerates_a_missing_file(root):
  path = W.join(root, "metrics.jsonl")
  assert W.truncate_to_step(path, 3) == 0
  W.makedirs(root)
  W.write_text(path, '{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n{"ste')
  assert W.truncate_to_step(path, 3) == 2
  assert _steps(path) == [1, 2, 3]
  assert W.truncate_to_step(path, 3) == 0


def test_dir_mirror_copies_new_and_changed_files(url, tmp_path):
  m = W.DirMirror(W.join(url, "tb"), local_dir=str(tmp_path / "tb"))
  ev = os.path.join(m.local_dir, "events.out.1")
  with open(ev, "wb") as f:
    f.write(b"abc")
  os.makedirs(os.path.join(m.local_dir, "sub"))
  with open(os.path.join(m.local_dir, "sub", "x"), "wb") as f:
    f.write(b"x")
  assert m.sync() == 2
  assert m.sync() == 0                              # nothing changed
  with open(ev, "ab") as f:
    f.write(b"def")
  assert m.sync() == 1
  fs, p = W.filesystem(W.join(url, "tb"))
  assert fs.cat_file(p + "/events.out.1") == b"abcdef" and fs.cat_file(p + "/sub/x") == b"x"
  local = W.DirMirror(str(tmp_path / "plain"))
  assert local.local_dir == str(tmp_path / "plain") and local.sync() == 0


def test_tensorboard_events_reach_the_url(url, tmp_path):
  """tensorboardX writes into the mirror's local directory; the synced events read back from the URL."""
  tbx = pytest.importorskip("tensorboardX")
  from tensorboardX.proto import event_pb2
  m = W.DirMirror(W.join(url, "tb"), local_dir=str(tmp_path / "tb_local"))
  w = tbx.SummaryWriter(m.local_dir)
  for s in range(3):
    w.add_scalar("loss", float(s), s)
  w.flush()
  m.sync()
  w.close()
  m.sync()
  fs, p = W.filesystem(W.join(url, "tb"))
  [name] = [f for f in fs.ls(p, detail=False) if "events" in f]
  data, vals = fs.cat_file(name), []
  while data:                                      # TFRecord: length u64, crc u32, payload, crc u32
    n = struct.unpack("<Q", data[:8])[0]
    ev = event_pb2.Event.FromString(data[12:12 + n])
    vals += [(ev.step, v.simple_value) for v in ev.summary.value if v.tag == "loss"]
    data = data[12 + n + 4:]
  assert vals == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_done_marker(root):
  assert not W.is_done(root)
  path = W.mark_done(root, 202)
  assert W.is_done(root) and path == W.join(root, "DONE")
  assert json.loads(W.read_text(path))["step"] == 202


def _tb_scalars(fs, directory, tag):
  """(step, value) of ``tag`` in the TensorBoard event files under ``directory`` of ``fs``."""
  from tensorboardX.proto import event_pb2
  vals = []
  for name in sorted(f for f in fs.ls(directory, detail=False) if "events" in f):
    data = fs.cat_file(name)
    while data:
      n = struct.unpack("<Q", data[:8])[0]
      ev = event_pb2.Event.FromString(data[12:12 + n])
      vals += [(ev.step, v.simple_value) for v in ev.summary.value if v.tag == tag]
      data = data[12 + n + 4:]
  return vals


def test_read_jsonl(root):
  assert W.read_jsonl(W.join(root, "none.jsonl")) == []
  W.write_text(W.join(root, "m.jsonl"), '{"step": 1}\n\n{"step": 2, "x": 0.5}\n')
  assert W.read_jsonl(W.join(root, "m.jsonl")) == [{"step": 1}, {"step": 2, "x": 0.5}]


def test_metric_writer_on_a_url_writes_jsonl_and_tensorboard_and_drops_rows_after_a_resume(url, tmp_path):
  """The trainer's MetricWriter with a memory:// workdir (standing in for gs://)."""
  pytest.importorskip("tensorboardX")
  from papo_jax import metrics as M
  from papo_jax.config_base import base_config
  c = base_config()
  c.log.tensorboard = True
  w = M.MetricWriter(url, c, 0)
  for s in range(1, 6):
    w.write(s, {"reward/overall": s / 10})
    w.write_samples(s, [{"prompt": "p", "response": f"r{s}", "answer": "1", "reward/overall": 0.0}])
  w.close()
  assert _steps(W.join(url, "metrics.jsonl")) == [1, 2, 3, 4, 5]
  assert _steps(W.join(url, "samples.jsonl")) == [1, 2, 3, 4, 5]
  fs, tb = W.filesystem(W.join(url, "tb"))
  assert _tb_scalars(fs, tb, "reward/overall") == [(s, pytest.approx(s / 10)) for s in range(1, 6)]
  w = M.MetricWriter(url, c, 3)             # resumed from the step-3 checkpoint: steps 4, 5 are recomputed
  for s in range(4, 7):
    w.write(s, {"reward/overall": s})
  w.close()
  assert [r["step"] for r in W.read_jsonl(W.join(url, "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
  assert [r["reward/overall"] for r in W.read_jsonl(W.join(url, "metrics.jsonl"))][3:] == [4.0, 5.0, 6.0]
  assert _steps(W.join(url, "samples.jsonl")) == [1, 2, 3]


def test_checkpoint_dir_must_be_local_or_gcs(tmp_path):
  """orbax writes local paths and gs:// only; another scheme fails at once, naming checkpoint.dir."""
  from papo_jax.checkpointing import checked_checkpoint_dir
  from papo_jax.config_base import ConfigError, base_config
  c = base_config()
  with pytest.raises(ConfigError, match=r"checkpoint\.dir.*memory://b/run/checkpoints.*local directory or a gs://"):
    checked_checkpoint_dir(c, "memory://b/run")
  c.checkpoint.dir = "s3://b/ckpt"
  with pytest.raises(ConfigError, match=r"checkpoint\.dir: 's3://b/ckpt'"):
    checked_checkpoint_dir(c, "memory://b/run")
  c.checkpoint.dir = str(tmp_path / "ckpt")
  assert checked_checkpoint_dir(c, "memory://b/run") == str(tmp_path / "ckpt")
  c.checkpoint.dir = ""
  assert checked_checkpoint_dir(c, "gs://b/run") == "gs://b/run/checkpoints"
  assert checked_checkpoint_dir(c, str(tmp_path)) == os.path.join(str(tmp_path), "checkpoints")
  assert checked_checkpoint_dir(c, f"file://{tmp_path}") == f"{tmp_path}/checkpoints"


def test_cache_dir_is_stable_per_url_and_key(tmp_path, monkeypatch):
  monkeypatch.setenv("PAPO_JAX_CACHE", str(tmp_path / "cache"))
  a = W.cache_dir("gs://b/run", {"seed": 0})
  assert a == W.cache_dir("gs://b/run", {"seed": 0}) and os.path.isdir(a)
  assert a.startswith(str(tmp_path / "cache"))
  assert len({a, W.cache_dir("gs://b/run", {"seed": 1}), W.cache_dir("gs://b/other", {"seed": 0})}) == 3
