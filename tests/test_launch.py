"""Launch scripts: dry runs print the full commands and run nothing; remote paths are localised."""

import os
import stat
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def trap_path(tmp_path):
  """A PATH whose gcloud/ssh/pip/python fail loudly, so a dry run that executes anything fails."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "ssh", "pip", "python", "scp"):
    p = bin_dir / name
    p.write_text(f"#!/bin/sh\necho 'EXECUTED {name}' >&2\nexit 97\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
  return f"{bin_dir}:{os.environ['PATH']}"


def _dry(script, command, path, **env):
  full = dict(os.environ, PATH=path, DRY_RUN="1", TMPDIR=env.pop("TMPDIR", "/tmp"), **env)
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), command], cwd=ROOT, env=full,
                        capture_output=True, text=True, timeout=60)


def test_scripts_parse():
  for script in ("tpu.sh", "gpu.sh", "common.sh"):
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_tpu_up_dry_run_prints_every_step_and_runs_nothing(trap_path, tmp_path):
  r = _dry("tpu.sh", "up", trap_path, NAME="papo-test", ZONE="us-west4-a", ACCELERATOR="v5litepod-16",
           VERSION="v2-alpha-tpuv5-lite", MODEL="gs://bucket/qwen", DATA=str(tmp_path), SPOT="1",
           CKPT="gs://bucket/runs/a", EXTRA_FLAGS="--config.train.steps=5", TMPDIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  assert "EXECUTED" not in r.stderr
  out = r.stdout
  lines = [l for l in out.splitlines() if l.startswith("+ ")]
  assert lines[0].startswith("+ gcloud compute tpus tpu-vm create papo-test --zone us-west4-a")
  assert "--accelerator-type v5litepod-16 --version v2-alpha-tpuv5-lite --spot" in lines[0]
  assert any("git -C" in l and "archive" in l for l in lines)
  assert any("tpu-vm scp --recurse" in l and "papo_stage/data" in l for l in lines)   # local data staged
  assert "MODEL gs://bucket/qwen: read by the trainer directly" in out
  train = [l for l in lines if "papo_jax.train" in l]
  assert len(train) == 1 and "--worker=all" in train[0]
  for piece in ("PAPO_DISTRIBUTED=1", "--config=configs/qwen25vl_3b.py", "--config.model.path=gs://bucket/qwen",
                "--config.checkpoint.dir=gs://bucket/runs/a", "--config.train.steps=5"):
    assert piece in train[0].replace("\\", ""), piece


@pytest.mark.parametrize("command", ["logs", "fetch-logs", "status", "stop", "delete"])
def test_tpu_other_commands_dry_run(trap_path, command):
  r = _dry("tpu.sh", command, trap_path, NAME="papo-test", NUM_WORKERS="2", LOGS_DIR="/nonexistent/logs")
  assert r.returncode == 0, r.stderr
  assert "EXECUTED" not in r.stderr
  assert r.stdout.startswith("+ mkdir" if command == "fetch-logs" else "+ gcloud compute tpus tpu-vm")
  if command == "fetch-logs":
    assert "--worker=0" in r.stdout and "--worker=1" in r.stdout


def test_missing_setting_is_named(trap_path):
  r = _dry("tpu.sh", "create", trap_path)
  assert r.returncode == 2 and "set NAME" in r.stderr
  r = _dry("gpu.sh", "train", trap_path)
  assert r.returncode == 2 and "set MODEL" in r.stderr
  r = _dry("tpu.sh", "launch-everything", trap_path, NAME="x")
  assert r.returncode == 2 and "unknown command" in r.stderr


@pytest.mark.parametrize("host", ["", "me@gpu-box"])
def test_gpu_dry_run(trap_path, host):
  r = _dry("gpu.sh", "train", trap_path, MODEL="/data/m", DATA="gs://b/d", WORKDIR="/data/run", HOST=host)
  assert r.returncode == 0, r.stderr
  assert "EXECUTED" not in r.stderr
  line = r.stdout.strip().splitlines()[-1].replace("\\", "")
  assert line.startswith("+ ssh me@gpu-box" if host else "+ bash -c")
  for piece in ("papo_jax.train", "--workdir=/data/run", "--config.model.path=/data/m", "--config.data.path=gs://b/d",
                "/data/run/train.log"):
    assert piece in line, piece


def test_remote_model_and_data_are_localised(tmp_path):
  """An fsspec URL (memory:// here; gs:// in production) is copied once and loads like a local path."""
  import fsspec
  import jax.numpy as jnp
  from papo_jax import models
  from papo_jax.data import remote, sources
  from papo_jax.data import testing
  pytest.importorskip("torch")
  import hf_utils as H

  hf = H.tiny_hf_model(seed=3)
  local = str(tmp_path / "hf")
  hf.save_pretrained(local)
  fs = fsspec.filesystem("memory")
  for name in os.listdir(local):
    fs.put_file(os.path.join(local, name), f"/bucket/ckpt/{name}")
  cache = str(tmp_path / "cache")
  got = remote.localize("memory://bucket/ckpt", cache_dir=cache)
  assert sorted(os.listdir(got)) == sorted(os.listdir(local))
  a = models.from_pretrained(got, dtype="float32")
  b = models.from_pretrained(local, dtype="float32")
  ids = jnp.asarray([[5, 6, 7, 8]])
  np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
  # second call reuses the completed copy
  fs.rm("/bucket/ckpt", recursive=True)
  assert remote.localize("memory://bucket/ckpt", cache_dir=cache) == got
  with pytest.raises(FileNotFoundError, match="memory://bucket/nothing"):
    remote.localize("memory://bucket/nothing", cache_dir=cache)
  assert remote.localize(local) == local and remote.localize("file://" + local) == local

  # a dataset directory with parquet shards holding real PNG bytes
  recs = [dict(problem=f"<image>How many? {i}", answer=str(i), images=[testing.encode(testing.natural_image(28, 28, i))])
          for i in range(3)]
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  testing.write_parquet(str(data_dir / "part-0.parquet"), recs[:2])
  testing.write_parquet(str(data_dir / "part-1.parquet"), recs[2:])
  for name in os.listdir(data_dir):
    fs.put_file(str(data_dir / name), f"/bucket/virl/{name}")
  src = sources.make_source("parquet", remote.localize("memory://bucket/virl", cache_dir=cache))
  assert len(src) == 3


def _fake_hf_cache(cache, repo, files_dir, commit="0123456789abcdef0123456789abcdef01234567"):
  """The Hugging Face cache layout of one downloaded snapshot (models--ORG--NAME/{refs,snapshots})."""
  import shutil
  storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
  os.makedirs(os.path.join(storage, "refs"))
  with open(os.path.join(storage, "refs", "main"), "w") as f:
    f.write(commit)
  shutil.copytree(files_dir, os.path.join(storage, "snapshots", commit))
  return os.path.join(storage, "snapshots", commit)


def test_hf_model_path_resolves_through_the_hub_cache(tmp_path, monkeypatch):
  """hf://ORG/NAME goes through huggingface_hub.snapshot_download; a cached snapshot is used offline."""
  import huggingface_hub
  from huggingface_hub import constants
  from papo_jax.data import remote
  src = tmp_path / "files"
  src.mkdir()
  (src / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
  (src / "model.safetensors").write_bytes(b"weights")
  cache = str(tmp_path / "hf_cache")
  snap = _fake_hf_cache(cache, "acme/tiny-vl", str(src))
  # The real snapshot_download, offline: it must find the cached snapshot and touch no network.
  monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  got = remote.localize("hf://acme/tiny-vl")
  assert os.path.realpath(got) == os.path.realpath(snap)
  assert open(os.path.join(got, "config.json")).read() == '{"model_type": "qwen2_5_vl"}'
  with pytest.raises(Exception):           # not cached and offline: an error, never a silent empty dir
    remote.localize("hf://acme/absent")

  # The repo id and revision reach snapshot_download; the result is what it returns.
  calls = []
  monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, revision=None: calls.append((repo, revision))
                      or str(src))
  assert remote.localize("hf://acme/tiny-vl@v2") == str(src)
  assert remote.localize("hf://acme/tiny-vl/") == str(src)
  assert calls == [("acme/tiny-vl", "v2"), ("acme/tiny-vl", None)]
  for bad in ("hf://tiny-vl", "hf://a/b/c", "hf:///b"):
    with pytest.raises(ValueError, match="hf://ORG/NAME"):
      remote.localize(bad)
