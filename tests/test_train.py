"""The training program end to end on the tiny synthetic task (CPU)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def tiny_config(variant="papo_g"):
  spec = importlib.util.spec_from_file_location("tiny_config", TINY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run(workdir, *overrides, timeout=600, wait=True):
  cmd = [sys.executable, "-m", "papo_jax.train", f"--config={TINY}", f"--workdir={workdir}", *overrides]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


SMALL = ("--config.train.steps=12", "--config.train.warmup_sft_steps=2", "--config.checkpoint.every=2",
         "--config.data.batch_size=4", "--config.rollout.n=2")


def _final_params(workdir):
  from flax import nnx
  from papo_jax.export import load_trained_model
  model, _, _, step = load_trained_model(workdir)
  leaves = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.split(model)[1])]
  return step, leaves


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("straight"))
  r = _run(wd, *SMALL)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return wd


def test_rewards_graded_during_logprob_pass_give_the_same_run(tmp_path):
  """Grading in the background while the log-prob pass runs changes timing only, not results."""
  runs = {}
  for overlap in (True, False):
    wd = str(tmp_path / f"overlap_{overlap}")
    r = _run(wd, *SMALL, "--config.train.steps=3", "--config.optim.mini_batches=2", "--config.val.every=0",
             f"--config.reward.overlap={overlap}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs[overlap] = (_final_params(wd), _metrics(wd))
  (step_a, a), m_a = runs[True]
  (step_b, b), m_b = runs[False]
  assert step_a == step_b == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert all("timing/reward_exposed" in m for m in m_a) and not any("timing/reward_exposed" in m for m in m_b)
  assert [m["reward/overall"] for m in m_a] == [m["reward/overall"] for m in m_b]


def test_sigkill_mid_run_resumes_bit_exact(uninterrupted, tmp_path):
  wd = str(tmp_path / "killed")
  p = _run(wd, *SMALL, wait=False)
  deadline = time.time() + 400
  metrics = os.path.join(wd, "metrics.jsonl")
  # Kill once the step-2 checkpoint is finalized (orbax renames it from a tmp dir) and step 3 is logged.
  while time.time() < deadline:
    if (os.path.isdir(os.path.join(wd, "checkpoints", "2")) and os.path.exists(metrics)
        and any(json.loads(l)["step"] >= 3 for l in open(metrics))):
      break
    if p.poll() is not None:
      pytest.fail("run ended before it could be killed:\n" + p.stdout.read()[-3000:])
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  r = _run(wd, *SMALL)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "resumed from step" in r.stderr
  step_a, a = _final_params(uninterrupted)
  step_b, b = _final_params(wd)
  assert step_a == step_b == 12
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # the resumed run's metrics for the steps after the checkpoint equal the uninterrupted run's
  ref = {m["step"]: m["reward/overall"] for m in _metrics(uninterrupted)}
  for m in _metrics(wd):
    assert m["reward/overall"] == ref[m["step"]], m["step"]


@pytest.mark.parametrize("override,field", [
    ("--config.model.init=pretrained", "model.path"),
    ("--config.model.no_such_field=1", "no_such_field"),
    ("--config.rollout.n=five", "rollout.n"),
    ("--config.optim.micro_batches=7", "optim.micro_batches"),
])
def test_config_error_names_the_field_and_writes_nothing(tmp_path, override, field):
  wd = str(tmp_path / "never")
  r = _run(wd, override, timeout=120)
  assert r.returncode != 0
  assert field in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(wd)


def test_export_loads_in_transformers_with_same_logits(uninterrupted, tmp_path):
  torch = pytest.importorskip("torch")
  import jax.numpy as jnp
  from transformers import Qwen2_5_VLForConditionalGeneration
  from papo_jax import models
  from papo_jax.export import export, load_trained_model
  out = export(uninterrupted, str(tmp_path / "hf"))
  ours, _, _, _ = load_trained_model(uninterrupted)
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval().float()
  cfg = ours.config
  rng = np.random.default_rng(0)
  ids = np.concatenate([[cfg.vision_start_token_id], [cfg.image_token_id] * 4, [cfg.vision_end_token_id],
                        rng.integers(0, 400, 10)])[None]
  pv = rng.normal(size=(16, 1176)).astype(np.float32)
  grid = np.array([[1, 4, 4]])
  ti = torch.as_tensor(ids)
  with torch.no_grad():
    ref = hf(input_ids=ti, pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(grid),
             mm_token_type_ids=(ti == cfg.image_token_id).long()).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pv), image_grid_thw=jnp.asarray(grid)))
  assert np.abs(got - ref).max() <= 1e-4
  assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_tiny_demo_learns(tmp_path):
  """A shortened README demo: mean reward rises well above its start (deterministic on CPU)."""
  from papo_jax.train import train
  c = tiny_config("papo_g")
  c.train.steps = 50
  c.checkpoint.every = 50
  metrics = train(c, str(tmp_path / "demo"))
  rows = _metrics(str(tmp_path / "demo"))
  start = np.mean([r["reward/overall"] for r in rows[:5]])
  end = np.mean([r["reward/overall"] for r in rows[-10:]])
  assert end > start + 0.1, (start, end)
  assert all(r["actor/kl_prcp"] > 0 for r in rows)
  assert metrics["reward/format"] > 0.5
  val = [r for r in rows if "val/overall" in r]
  assert [r["step"] for r in val] == [20, 40, 50]  # held-out validation every 20 steps and at the end
  assert all(0.0 <= r["val/accuracy"] <= 1.0 for r in val)


def test_eval_reads_a_training_workdir(uninterrupted, tmp_path):
  """`papo_jax.eval --checkpoint=<workdir>` evaluates the latest training step (the same params)."""
  import test_eval
  test_eval.write_benchmarks(str(tmp_path / "bench"))
  c = test_eval.tiny_eval_config(tmp_path, benchmarks=("geometry3k",))
  cmd = [sys.executable, "-m", "papo_jax.eval", f"--config={TINY}:grpo", f"--checkpoint={uninterrupted}",
         f"--out={tmp_path / 'out'}", "--config.reward.name=synthetic", f"--config.eval.data_dir={c.eval.data_dir}",
         "--config.eval.k=2", "--config.eval.max_new_tokens=4", "--config.eval.batch_size=2",
         "--config.eval.max_pixels=3136", "--config.eval.benchmarks=('geometry3k',)"]
  r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "| geometry3k | general | 5 | 0 |" in r.stdout
  assert "evaluating" in r.stderr and "step 12" in r.stderr
  res = json.load(open(tmp_path / "out" / "results.json"))
  assert res["k"] == 2 and res["summaries"][0]["questions"] == 5


def test_tiny_qwen3_trains_and_exports(tmp_path):
  """configs/tiny.py:qwen3 runs PAPO-G steps end to end on a tiny Qwen3-VL; the export loads in transformers."""
  torch = pytest.importorskip("torch")
  import jax.numpy as jnp
  from transformers import Qwen3VLForConditionalGeneration
  from papo_jax.export import export, load_trained_model
  wd = str(tmp_path / "qwen3")
  cmd = [sys.executable, "-m", "papo_jax.train", f"--config={TINY}:qwen3", f"--workdir={wd}",
         "--config.train.steps=2", "--config.train.warmup_sft_steps=0", "--config.checkpoint.every=2",
         "--config.data.batch_size=4", "--config.rollout.n=2", "--config.val.every=0"]
  r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  with open(os.path.join(wd, "model", "config.json")) as f:
    assert json.load(f)["model_type"] == "qwen3_vl"
  rows = _metrics(wd)
  assert [m["step"] for m in rows] == [1, 2]
  for m in rows:   # the perception KL is computed and every loss term is finite
    assert m["actor/kl_prcp"] > 0 and np.isfinite(m["actor/loss_total"]) and 0 < m["actor/grad_norm"] < 1e3
  out = export(wd, str(tmp_path / "hf"))
  ours, _, _, step = load_trained_model(wd)
  assert step == 2
  hf = Qwen3VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval().float()
  cfg = ours.config
  rng = np.random.default_rng(0)
  ids = np.concatenate([[cfg.vision_start_token_id], [cfg.image_token_id] * 4, [cfg.vision_end_token_id],
                        rng.integers(0, 400, 10)])[None]
  pv = rng.normal(size=(16, 1536)).astype(np.float32)
  grid = np.array([[1, 4, 4]])
  ti = torch.as_tensor(ids)
  with torch.no_grad():
    ref = hf(input_ids=ti, pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(grid),
             mm_token_type_ids=(ti == cfg.image_token_id).long()).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pv), image_grid_thw=jnp.asarray(grid)))
  assert np.abs(got - ref).max() <= 1e-4


def test_reward_format_mode_follows_the_chat_template(tmp_path):
  """reward.format_mode=auto: '.*</think>.*\\boxed{}' for templates that open <think> (Qwen3-VL Thinking)."""
  from papo_jax.data import processor as proc_lib
  from papo_jax.data import tiny_tokenizer
  from papo_jax.train import format_mode
  c = tiny_config("qwen3")
  modes = {}
  for name, kw in (("qwen25", {}), ("instruct", dict(family="qwen3_vl")),
                   ("thinking", dict(family="qwen3_vl", thinking=True))):
    d = str(tmp_path / name)
    tiny_tokenizer.build_tiny_checkpoint_files(d, **kw)
    modes[name] = format_mode(c, proc_lib.Processor.from_pretrained(d))
  assert modes == {"qwen25": "think", "instruct": "think", "thinking": "thinking"}
  c.reward.format_mode = "think"
  assert format_mode(c, proc_lib.Processor.from_pretrained(str(tmp_path / "thinking"))) == "think"
