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
  # An existing VM is looked up first (and reused), then created.
  assert lines[0].startswith("+ gcloud compute tpus tpu-vm describe papo-test --zone us-west4-a")
  assert lines[1].startswith("+ gcloud compute tpus tpu-vm create papo-test --zone us-west4-a")
  assert "--accelerator-type v5litepod-16 --version v2-alpha-tpuv5-lite --spot" in lines[1]
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
  r = _dry("gpu.sh", "train", trap_path, MODEL="/data/m", DATA="gs://b/d", WORKDIR="/data/run", HOST=host,
           WANDB_API_KEY="wandb0secret0value0123")
  assert r.returncode == 0, r.stderr
  assert "EXECUTED" not in r.stderr
  assert "wandb0secret0value0123" not in r.stdout + r.stderr
  line = r.stdout.strip().splitlines()[-1].replace("\\", "")
  assert "WANDB_API_KEY='****'" in line
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


# ---------------------------------------------------------------------------------------------
# Slice sizes, queued resources, tokens, supervise
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("acc,n", [("v5litepod-1", 1), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v5litepod-256", 64),
                                   ("v5p-8", 1), ("v5p-16", 2), ("v5p-128", 16), ("v6e-8", 1), ("v6e-16", 4),
                                   ("v6e-256", 64), ("v4-8", 1), ("v4-32", 4), ("v3-8", 1), ("v2-32", 4)])
def test_num_workers_from_the_accelerator_type(trap_path, acc, n):
  r = _dry("tpu.sh", "workers", trap_path, ACCELERATOR=acc)
  assert r.returncode == 0 and r.stdout.strip() == str(n), (r.stdout, r.stderr)


def test_num_workers_override_and_unknown_types(trap_path):
  assert _dry("tpu.sh", "workers", trap_path, ACCELERATOR="v5litepod-16", NUM_WORKERS="3").stdout.strip() == "3"
  r = _dry("tpu.sh", "workers", trap_path, ACCELERATOR="tpu9z-8")
  assert r.returncode == 2 and "set NUM_WORKERS" in r.stderr
  r = _dry("tpu.sh", "fetch-logs", trap_path, NAME="p", ACCELERATOR="v5litepod-16", LOGS_DIR="/nonexistent/logs")
  assert r.returncode == 0, r.stderr
  assert [f"--worker={w}" in r.stdout for w in range(5)] == [True] * 4 + [False]


TOKENS = dict(WANDB_API_KEY="wandb0secret0value0123", HF_TOKEN="hf_secretTOKEN987")


def test_queued_up_dry_run_forwards_masked_tokens(trap_path, tmp_path):
  r = _dry("tpu.sh", "up", trap_path, NAME="papo-v5p", ZONE="us-east5-a", ACCELERATOR="v5p-16",
           VERSION="v2-alpha-tpuv5", QUEUED="1", SPOT="1", MODEL="hf://Qwen/Qwen2.5-VL-3B-Instruct",
           DATA="gs://b/virl", WORKDIR="gs://b/runs/a", TMPDIR=str(tmp_path), **TOKENS)
  assert r.returncode == 0, r.stderr
  assert "EXECUTED" not in r.stderr
  for secret in TOKENS.values():
    assert secret not in r.stdout and secret not in r.stderr
  lines = [l.replace("\\", "") for l in r.stdout.splitlines() if l.startswith("+ ")]
  assert lines[0].startswith("+ gcloud compute tpus queued-resources describe papo-v5p-qr --zone us-east5-a")
  assert lines[1] == ("+ gcloud compute tpus queued-resources create papo-v5p-qr --node-id papo-v5p --zone us-east5-a "
                      "--accelerator-type v5p-16 --runtime-version v2-alpha-tpuv5 --spot")
  assert lines[2].startswith("+ gcloud compute tpus queued-resources describe papo-v5p-qr")       # qr-wait
  assert not any("tpu-vm create" in l for l in lines)
  assert "MODEL hf://Qwen/Qwen2.5-VL-3B-Instruct: read by the trainer directly" in r.stdout
  [train] = [l for l in lines if "papo_jax.train" in l]
  assert "WANDB_API_KEY='****' HF_TOKEN='****' PAPO_DISTRIBUTED=1" in train
  assert "--config.model.path=hf://Qwen/Qwen2.5-VL-3B-Instruct" in train and "--workdir=gs://b/runs/a" in train


@pytest.mark.parametrize("command,expect", [
    ("qr-list", "+ gcloud compute tpus queued-resources list --zone us-east5-a --project proj"),
    ("qr-delete", "+ gcloud compute tpus queued-resources delete n-qr --zone us-east5-a --project proj --force --quiet"),
    ("qr-wait", "+ gcloud compute tpus queued-resources describe n-qr --zone us-east5-a --project proj"),
    ("status", "+ gcloud compute tpus queued-resources describe n-qr --zone us-east5-a --project proj"),
])
def test_queued_resource_commands_dry_run(trap_path, command, expect):
  r = _dry("tpu.sh", command, trap_path, NAME="n", ZONE="us-east5-a", PROJECT="proj", QUEUED="1")
  assert r.returncode == 0, r.stderr
  assert "EXECUTED" not in r.stderr
  assert r.stdout.splitlines()[0].startswith(expect), r.stdout


def test_supervise_dry_run_prints_one_recovery(trap_path, tmp_path):
  r = _dry("tpu.sh", "supervise", trap_path, NAME="n", MODEL="gs://b/m", DATA="gs://b/d", WORKDIR="gs://b/run",
           QUEUED="1", SPOT="1", TMPDIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  assert "EXECUTED" not in r.stderr
  lines = [l for l in r.stdout.splitlines() if l.startswith("+ ")]
  assert lines[0] == "+ gcloud storage ls gs://b/run/DONE"
  assert "queued-resources delete n-qr" in lines[2] and "--force" in lines[2]
  assert any("queued-resources create n-qr" in l for l in lines)
  assert "papo_jax.train" in lines[-1]


FAKE_GCLOUD = r"""#!/bin/bash
# A scripted gcloud: logs every call; answers from the files in $FAKE_STATE.
S="$FAKE_STATE"
echo "$*" >> "$S/calls"
args="$*"
pop() { local f="$S/$1"; [ -s "$f" ] || { echo "$2"; return; }; head -n1 "$f"; sed -i 1d "$f"; }
case "$args" in
  "storage ls"*) [ -e "$S/done" ] ;;
  *"queued-resources describe"*) st="$(pop qr_states ACTIVE)"; [ "$st" = "-" ] && exit 1; echo "$st" ;;
  *"tpu-vm describe"*) st="$(pop vm_states READY)"; [ "$st" = "-" ] && exit 1; echo "$st" ;;
  *"pgrep"*) if [ -e "$S/training" ]; then touch "$S/done"; exit 0; fi; exit 1 ;;
  *"nohup python -m papo_jax.train"*) touch "$S/training"; echo "$args" >> "$S/trains" ;;
  *"pkill"*|*"tpu-vm delete"*|*"queued-resources delete"*) rm -f "$S/training" ;;
  *) exit 0 ;;
esac
"""


def _supervise(tmp_path, **env):
  state = tmp_path / "state"
  state.mkdir(exist_ok=True)
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir(exist_ok=True)
  g = bin_dir / "gcloud"
  g.write_text(FAKE_GCLOUD)
  g.chmod(0o755)
  for k in [k for k in env if k.endswith("_states")]:
    (state / k).write_text("\n".join(env.pop(k)) + "\n")
  full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_STATE=str(state), POLL_S="0",
              TMPDIR=str(tmp_path), NAME="n", MODEL="gs://b/m", DATA="gs://b/d", WORKDIR="gs://b/run", **env)
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu.sh"), "supervise"], cwd=ROOT, env=full,
                     capture_output=True, text=True, timeout=120)
  calls = (state / "calls").read_text().splitlines()
  trains = (state / "trains").read_text().splitlines() if (state / "trains").exists() else []
  return r, calls, trains


def test_supervise_recreates_a_preempted_vm_and_restarts_until_done(tmp_path):
  # look 1: PREEMPTED -> delete, create (absent: "-"), install, stage, train; look 2: READY + training -> done.
  r, calls, trains = _supervise(tmp_path, vm_states=["PREEMPTED", "-", "READY"], SPOT="1", **TOKENS)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "n is PREEMPTED: recreating it" in r.stdout and "run finished" in r.stdout
  order = [next(i for i, c in enumerate(calls) if pat in c)
           for pat in ("tpu-vm delete n", "tpu-vm create n", "tpu-vm scp", "nohup python -m papo_jax.train")]
  assert order == sorted(order), calls
  assert "--spot" in next(c for c in calls if "tpu-vm create" in c)
  assert len(trains) == 1
  assert f"WANDB_API_KEY='{TOKENS['WANDB_API_KEY']}' HF_TOKEN='{TOKENS['HF_TOKEN']}'" in trains[0]   # forwarded
  for secret in TOKENS.values():
    assert secret not in r.stdout and secret not in r.stderr                                         # never shown


def test_supervise_recreates_a_suspended_queued_resource(tmp_path):
  r, calls, trains = _supervise(tmp_path, QUEUED="1", qr_states=["SUSPENDED", "-", "PROVISIONING", "ACTIVE", "ACTIVE"])
  assert r.returncode == 0, r.stdout + r.stderr
  assert "n is SUSPENDED: recreating it" in r.stdout
  assert any("queued-resources delete n-qr" in c and "--force" in c for c in calls)
  assert any(c.startswith("compute tpus queued-resources create n-qr --node-id n") for c in calls)
  assert "queued resource n-qr is ACTIVE" in r.stdout and len(trains) == 1


def test_supervise_restarts_a_stopped_trainer_and_gives_up_after_max_restarts(tmp_path):
  # READY but no trainer: pkill + train, then the trainer runs to the end.
  r, calls, trains = _supervise(tmp_path, vm_states=["READY", "READY"])
  assert r.returncode == 0, r.stdout + r.stderr
  assert "up but not training" in r.stdout and len(trains) == 1
  assert not any("tpu-vm create" in c for c in calls)
  # A slice that never comes back: bounded.
  again = tmp_path / "again"
  again.mkdir()
  r, calls, trains = _supervise(again, vm_states=["FAILED", "-"] * 10, MAX_RESTARTS="2")
  assert r.returncode == 1 and "giving up" in r.stderr
  assert sum("tpu-vm create" in c for c in calls) == 2                  # two recoveries, then it stops


def test_up_reuses_an_existing_vm(tmp_path):
  state = tmp_path / "state"
  r, calls, _ = _supervise(tmp_path, vm_states=["READY"])      # sets up the fake; a finished run
  env = dict(os.environ, PATH=f"{tmp_path / 'fakebin'}:{os.environ['PATH']}", FAKE_STATE=str(state), NAME="n")
  (state / "vm_states").write_text("READY\n")
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu.sh"), "create"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and "TPU VM n exists (READY): reusing it" in r.stdout
  (state / "vm_states").write_text("PREEMPTED\n")
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu.sh"), "create"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 1 and "exists in state PREEMPTED" in r.stderr
  assert not any("tpu-vm create" in c for c in (state / "calls").read_text().splitlines())
