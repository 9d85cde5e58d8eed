"""The training program: one RL step's pieces (fast) and end to end on the tiny synthetic task (slow, CPU)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from papo_jax import train as T

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


def _metrics(workdir, *, with_initial_validation=False):
  """metrics.jsonl's training-step rows (steps 1..); the row of step 0 (held-out scores of
  the policy RL starts from, when val.every > 0) only on request."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return rows if with_initial_validation else [r for r in rows if r["step"] >= 1]


def _steps_logged(path):
  """Complete training-step rows in a metrics.jsonl being written (the step-0 validation row excluded)."""
  with open(path) as f:
    return sum(line.endswith("\n") and not line.startswith('{"step": 0,') for line in f)


def _samples(workdir):
  with open(os.path.join(workdir, "samples.jsonl")) as f:
    return [json.loads(line) for line in f]


# Two mini-batches: the log-prob pass runs before the first update, and rewards are graded in the
# background meanwhile (reward.overlap, on by default).
SMALL = ("--config.train.steps=12", "--config.train.warmup_sft_steps=2", "--config.checkpoint.every=2",
         "--config.data.batch_size=4", "--config.rollout.n=2", "--config.optim.mini_batches=2")


def _final_params(workdir):
  from flax import nnx
  from papo_jax.export import load_trained_model
  model, _, _, step = load_trained_model(workdir)
  leaves = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.split(model)[1])]
  return step, leaves


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("straight"))
  r = _run(wd, *SMALL, "--config.log.samples_every=4")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "finished 12/12 steps" in r.stderr and "metrics.jsonl" in r.stderr      # the closing summary
  assert "orbax" not in r.stderr.lower().replace("orbax-checkpoint", "")  # orbax INFO is silenced
  samples = [json.loads(line) for line in open(os.path.join(wd, "samples.jsonl"))]
  assert sorted({s["step"] for s in samples}) == [4, 8, 12]
  assert all({"prompt", "answer", "response", "reward/overall"} <= set(s) for s in samples)
  assert all("timing/reward_exposed" in m for m in _metrics(wd))   # graded in the background
  return wd


# ============================================================================================
# The step's pieces (no model: a scripted sampler and grader)
# ============================================================================================

def _prompt_batch(answers, index, prompt_len=6):
  b = len(answers)
  return types.SimpleNamespace(
      input_ids=np.arange(b * prompt_len).reshape(b, prompt_len) % 50 + 30,
      attention_mask=np.ones((b, prompt_len), int),
      pixel_values=None, masked_pixel_values=None, image_grid_thw=np.zeros((0, 3), int),
      image_counts=np.zeros(b, int), num_images=0, answers=list(answers), problems=[f"q{a}" for a in answers],
      batch_size=b, stats={"batch_index": index, "skipped_total/too_long": index})


class _ScriptedSampler:
  """Response r of a prompt is the token (100 + r); the reward says whether it is < the prompt's answer."""

  def __init__(self):
    self.calls = []

  def generate(self, params, ids, mask, pv, grid, n, key):
    self.calls.append((ids.shape[0], key))
    toks = np.tile(100 + np.arange(n), ids.shape[0])[:, None].repeat(3, 1)
    return types.SimpleNamespace(tokens_RxT=toks, mask_RxT=np.ones_like(toks))


class _Tok:
  def decode(self, ids, skip_special_tokens=False):
    return str(ids[0] - 100)


def _count_below(texts, answers):
  acc = np.asarray([int(t) < int(a) for t, a in zip(texts, answers)], np.float32)
  return {"overall": acc, "accuracy": acc, "format": np.ones_like(acc)}


def _fake_run(c, batches):
  import concurrent.futures
  return T.Run(c=c, mesh=None, graphdef=None, model_config=None, it=iter(batches), tokenizer=_Tok(),
               sampler=_ScriptedSampler(), reward_fn=_count_below,
               grader=concurrent.futures.ThreadPoolExecutor(1), train_step=None, logprob_pass=None, stop_ids=(),
               pad_id=0)


def _small_config(**algo):
  c = tiny_config("dapo" if algo.get("dynamic_sampling") else "grpo")
  c.rollout.n = 4
  c.data.batch_size = 3
  c.algo.update(algo)
  return c


def test_dapo_refills_in_chunks_until_enough_groups_survive_then_truncates():
  """papo.md §4: chunks of algo.dapo_chunk prompts until data.batch_size groups are informative."""
  c = _small_config(dynamic_sampling=True, dapo_chunk=2, dapo_max_rounds=20)
  assert T.train_data_config(c).batch_size == 2          # the pipeline reads one chunk per batch
  # answers: 0 = all wrong, 4 = all right (both dropped); 1..3 = mixed (kept)
  chunks = [_prompt_batch(a, i) for i, a in enumerate([("0", "4"), ("2", "0"), ("4", "4"), ("1", "3"), ("2", "2")])]
  run = _fake_run(c, chunks)
  col = T.collect_groups(run, None, step=0)
  assert col.rounds == 4 and [n for n, _ in run.sampler.calls] == [2, 2, 2, 2]
  assert len(col.groups) == 3                            # 3 survived: exactly data.batch_size, none more
  rewards, _ = col.rewards.result()
  assert rewards["accuracy"].reshape(3, 4).mean(1).tolist() == [0.5, 0.25, 0.75]
  assert [a for _, a, _ in col.samples][::4] == ["2", "1", "3"]
  assert col.stats["batch_index"] == 3


def test_dapo_stops_after_max_rounds_with_a_full_batch():
  """Too few informative groups after algo.dapo_max_rounds: filtered groups (zero advantage) fill
  the batch, so the update keeps data.batch_size groups and its micro-batch split."""
  from papo_jax.rl import advantages as adv_lib
  c = _small_config(dynamic_sampling=True, dapo_chunk=2, dapo_max_rounds=3)
  run = _fake_run(c, [_prompt_batch(a, i) for i, a in enumerate([("0", "4"), ("2", "4"), ("0", "0")] * 3)])
  col = T.collect_groups(run, None, step=0)
  assert col.rounds == 3 and len(run.sampler.calls) == 3
  assert len(col.groups) == 3 and col.padded_groups == 2
  rewards, _ = col.rewards.result()
  acc = rewards["accuracy"].reshape(3, 4)
  assert acc.mean(1).tolist() == [0.5, 0.0, 1.0]   # the kept group, then filtered ones in arrival order
  adv = adv_lib.group_advantages(rewards["overall"], group_size=4).reshape(3, 4)
  assert np.abs(adv[0]).sum() > 0 and not adv[1:].any()
  assert [a for _, a, _ in col.samples][::4] == ["2", "0", "4"]


def test_dapo_rounds_that_cannot_fill_a_batch_are_a_config_error():
  from papo_jax.config_base import ConfigError, validate_config
  c = _small_config(dynamic_sampling=True, dapo_chunk=1, dapo_max_rounds=2)
  with pytest.raises(ConfigError, match="algo.dapo_max_rounds"):
    validate_config(c)


@pytest.mark.parametrize("overlap,mini", [(False, 1), (False, 3), (True, 3)])
def test_grpo_rewards_come_back_the_same_way_with_or_without_background_grading(overlap, mini):
  c = _small_config()
  c.reward.overlap, c.optim.mini_batches = overlap, mini
  run = _fake_run(c, [_prompt_batch(("1", "2", "4"), 0)])
  col = T.collect_groups(run, None, step=5)
  assert col.graded_in_background == (overlap and mini > 1)
  rewards, seconds = col.rewards.result()
  assert rewards["accuracy"].tolist() == [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1] and seconds >= 0
  assert len(col.groups) == 3 and col.rounds == 1
  assert all((g.advantages == 0).all() for g in col.groups)   # set by update() from the rewards


def test_rollout_keys_are_a_fold_in_chain():
  import jax
  def key(seed, step, round_, batch):
    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), round_), batch)
    return jax.random.key_data(k).tolist()
  got = lambda *a: jax.random.key_data(T.rollout_key(*a)).tolist()
  assert got(0, 3, 1, 7) == key(0, 3, 1, 7)
  assert len({str(got(0, s, r, 0)) for s in range(3) for r in range(3)}) == 9


def test_a_workdir_url_orbax_cannot_write_needs_a_checkpoint_dir(tmp_path):
  """memory:// records are fine, but checkpoints there are not: the program says which field to set, at once."""
  r = _run("memory://bucket/run", timeout=120)
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
  assert "checkpoint.dir" in r.stderr and "gs://" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")
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
  # the resumed run's metrics for the steps after the checkpoint equal the uninterrupted run's, each step once
  ref = {m["step"]: m["reward/overall"] for m in _metrics(uninterrupted)}
  assert [m["step"] for m in _metrics(wd)] == list(range(1, 13))
  for m in _metrics(wd):
    assert m["reward/overall"] == ref[m["step"]], m["step"]
  # a rerun of the finished run says so and changes nothing
  again = _run(wd, *SMALL)
  assert again.returncode == 0 and "already finished" in again.stderr, again.stderr[-2000:]
  assert [m["step"] for m in _metrics(wd)] == list(range(1, 13))


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")
def test_continuous_engine_trains_as_the_static_sampler(uninterrupted, tmp_path):
  """The trainer with rollout.engine=continuous (4 slots for the step's 8 samples, so slots are reused)
  logs the static sampler's run: the same samples, so the same rewards and losses."""
  wd = str(tmp_path / "continuous")
  r = _run(wd, *SMALL[1:], "--config.train.steps=3", "--config.rollout.engine=continuous",
           "--config.rollout.num_slots=4", "--config.rollout.min_decode_lanes=1", "--config.rollout.prefill_chunk=32")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  ref = {m["step"]: m for m in _metrics(uninterrupted)}
  got = _metrics(wd)
  assert [m["step"] for m in got] == [1, 2, 3]
  for m in got:
    want = ref[m["step"]]
    for k in ("reward/overall", "reward/accuracy", "response_length/mean"):
      assert m[k] == want[k], (m["step"], k)
    for k in ("actor/pg_loss", "actor/kl_prcp", "actor/grad_norm"):
      np.testing.assert_allclose(m[k], want[k], rtol=1e-4, atol=1e-7, err_msg=f"step {m['step']} {k}")


def _compared(row):
  """A metrics row without its wall-clock keys (everything else is deterministic on CPU)."""
  return {k: v for k, v in row.items() if not k.startswith(("timing/", "throughput/"))}


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_bit_exact(uninterrupted, tmp_path):
  """A preempted VM's SIGTERM: exit 0 with a checkpoint of the finished step; the rerun computes each
  remaining step once and ends where the uninterrupted run ends (metrics, samples and parameters
  bit-exact). This run grades rewards in the foreground, the uninterrupted one in the background
  during the log-prob pass: that changes timing only."""
  from papo_jax import workdir as W
  wd = str(tmp_path / "preempted")
  # checkpoint.every beyond the run: the only mid-run checkpoint is the one the SIGTERM writes
  args = (*SMALL, "--config.log.samples_every=4", "--config.checkpoint.every=100", "--config.reward.overlap=False")
  log = open(tmp_path / "first.log", "w")
  p = subprocess.Popen([sys.executable, "-m", "papo_jax.train", f"--config={TINY}", f"--workdir={wd}", *args],
                       cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
  metrics, deadline = os.path.join(wd, "metrics.jsonl"), time.time() + 400
  # two training steps logged (the step-0 held-out row does not count), so the stop lands mid-run
  while not (os.path.exists(metrics) and _steps_logged(metrics) >= 2):
    if p.poll() is not None or time.time() > deadline:
      p.kill()
      pytest.fail("run ended before SIGTERM:\n" + open(tmp_path / "first.log").read()[-3000:])
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=300) == 0, open(tmp_path / "first.log").read()[-3000:]
  log.close()
  first = open(tmp_path / "first.log").read()
  saved = [m["step"] for m in _metrics(wd)]
  k = saved[-1]
  assert saved == list(range(1, k + 1)) and 2 <= k < 12, saved
  assert f"stopping after step {k - 1} on SIGTERM: checkpoint at step {k} written" in first, first[-3000:]
  assert sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()) == [k]
  monitor = json.load(open(os.path.join(wd, "checkpoints", str(k), "meta", "metadata")))["monitor"]
  assert monitor["gamma_halvings"] == 0 and len(monitor["hist"]) == min(k, 10)   # monitor.window = 10
  assert not W.is_done(wd)                          # supervise must restart a preempted run
  r = _run(wd, *args)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert f"resumed from step {k} " in r.stderr and f"finished {12 - k}/12 steps" in r.stderr, r.stderr[-3000:]
  assert W.is_done(wd) and json.loads(W.read_text(os.path.join(wd, "DONE")))["step"] == 12
  rows = _metrics(wd)
  assert [m["step"] for m in rows] == list(range(1, 13))    # no step logged twice, none missing
  assert [_compared(m) for m in rows] == [_compared(m) for m in _metrics(uninterrupted)]
  assert not any("timing/reward_exposed" in m for m in rows)
  assert _samples(wd) == _samples(uninterrupted)
  step_a, a = _final_params(uninterrupted)
  step_b, b = _final_params(wd)
  assert step_a == step_b == 12 and len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_workdir_on_a_url(tmp_path, monkeypatch):
  """A memory:// workdir (standing in for gs://): metrics, samples, config, TensorBoard and DONE land there;
  the tiny model is built in the local cache and checkpoints go to a local checkpoint.dir."""
  import uuid
  import fsspec
  from papo_jax import workdir as W
  monkeypatch.setenv("PAPO_JAX_CACHE", str(tmp_path / "cache"))
  url = f"memory://bucket-{uuid.uuid4().hex[:8]}/run"
  c = tiny_config("papo_g")
  c.train.steps, c.train.warmup_sft_steps, c.val.every = 2, 1, 0
  c.data.batch_size, c.rollout.n, c.log.samples_every, c.log.tensorboard = 4, 2, 1, True
  c.checkpoint.dir = str(tmp_path / "ckpt")
  try:
    metrics = T.train(c, url)
    fs, root = W.filesystem(url)
    rows = W.read_jsonl(W.join(url, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["reward/overall"] == metrics["reward/overall"]
    # the reference policy is the policy after the format warm-up: the first update starts on it
    assert abs(rows[0]["actor/kl_ref"]) <= 1e-6 < abs(rows[1]["actor/kl_ref"])
    samples = W.read_jsonl(W.join(url, "samples.jsonl"))
    assert sorted({r["step"] for r in samples}) == [1, 2]
    # one mini-batch: a sample step runs the log-prob pass for the tokens' visual dependency alone
    assert c.optim.mini_batches == 1 and all(len(r["dependency"]) == len(r["tokens"]) >= 1 for r in samples)
    assert json.loads(W.read_text(W.join(url, "config.json")))["train"]["steps"] == 2
    assert any("events" in f for f in fs.ls(root + "/tb", detail=False))
    assert W.is_done(url)
    assert os.path.isdir(tmp_path / "ckpt" / "2")
    [model_dir] = os.listdir(tmp_path / "cache" / "workdirs")
    assert os.path.exists(tmp_path / "cache" / "workdirs" / model_dir / "model" / "model.safetensors")
    assert not os.path.exists("memory:")                  # nothing written to a local path named after the URL
    assert T.train(c, url) == rows[-1]                      # a rerun of the finished run reads the rows back
  finally:
    fsspec.filesystem("memory").rm(url.split("://")[1], recursive=True)


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")
def test_samples_carry_visual_dependency_and_inspect_renders(uninterrupted, tmp_path):
  """PAPO-G: each sample step has the masked log-probs of the log-prob pass, so the logged rows carry
  every response token's visual dependency, the step's images and histogram are written, and
  `python -m papo_jax.inspect` renders the last step."""
  from PIL import Image
  rows = _samples(uninterrupted)
  assert sorted({r["step"] for r in rows}) == [4, 8, 12]
  for r in rows:
    assert len(r["tokens"]) == len(r["dependency"]) >= 1
    assert all(0.0 <= d <= 10.0 for d in r["dependency"])
    assert "".join(r["tokens"]).startswith(r["response"])   # the tokens' text, the stop token included
    assert [t["index"] for t in r["top_tokens"]] == sorted(range(len(r["dependency"])),
                                                            key=lambda i: -r["dependency"][i])[:len(r["top_tokens"])]
    image = np.asarray(Image.open(os.path.join(uninterrupted, r["images"][0]["image"])))
    masked = np.asarray(Image.open(os.path.join(uninterrupted, r["images"][0]["masked"])))
    assert image.shape == masked.shape == (112, 112, 3) and (masked == 0).all(-1).sum() > (image == 0).all(-1).sum()
  assert any(d > 0 for r in rows for d in r["dependency"])      # the masked image changes the policy
  for step in (4, 8, 12):
    hist = json.load(open(os.path.join(uninterrupted, "samples", f"step_{step}", "dependency.json")))
    assert sum(hist["counts"]) == hist["tokens"] > 0
  out = tmp_path / "pages"
  r = subprocess.run([sys.executable, "-m", "papo_jax.inspect", f"--workdir={uninterrupted}", f"--out={out}"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == str(out / "index.html"), r.stderr[-2000:]
  assert "step 12" in (out / "index.html").read_text() and "<svg" in (out / "index.html").read_text()
  assert 'class="tok' in (out / "sample_0.html").read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")
def test_export_loads_in_transformers_with_same_logits(uninterrupted, tmp_path):
  torch = pytest.importorskip("torch")
  import jax.numpy as jnp
  from transformers import Qwen2_5_VLForConditionalGeneration
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


@pytest.mark.slow
def test_tiny_demo_learns(tmp_path):
  """A shortened README demo: mean reward rises well above its start (deterministic on CPU)."""
  wd = str(tmp_path / "demo")
  every, steps = 40, 80   # the colour task leaves chance at ~step 40-50 (the full demo runs 150)
  r = _run(wd, f"--config.train.steps={steps}", f"--config.checkpoint.every={steps}", f"--config.val.every={every}",
           "--config.val.batches=1")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  rows = _metrics(wd)
  start = np.mean([r["reward/overall"] for r in rows[:5]])
  end = np.mean([r["reward/overall"] for r in rows[-10:]])
  assert end > start + 0.1, (start, end)
  assert all(r["actor/kl_prcp"] > 0 for r in rows)
  assert rows[-1]["reward/format"] > 0.5
  val = [r for r in _metrics(wd, with_initial_validation=True) if "val/overall" in r]
  # held-out validation before RL, every val.every steps and at the end
  assert [r["step"] for r in val] == sorted({0, *range(every, steps + 1, every), steps})
  assert all(0.0 <= r["val/accuracy"] <= 1.0 for r in val)


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")
def test_eval_reads_a_training_workdir(uninterrupted, tmp_path):
  """`papo_jax.eval --checkpoint=<workdir>` evaluates the latest training step (the same params)."""
  from hf_utils import write_geometry3k
  bench = write_geometry3k(str(tmp_path / "bench"))
  cmd = [sys.executable, "-m", "papo_jax.eval", f"--config={TINY}:grpo", f"--checkpoint={uninterrupted}",
         f"--out={tmp_path / 'out'}", "--config.reward.name=synthetic", f"--config.eval.data_dir={bench}",
         "--config.eval.k=2", "--config.eval.max_new_tokens=4", "--config.eval.batch_size=2",
         "--config.eval.max_pixels=3136", "--config.eval.benchmarks=('geometry3k',)"]
  r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "| geometry3k | general | 5 | 0 |" in r.stdout
  assert "evaluating" in r.stderr and "step 12" in r.stderr
  res = json.load(open(tmp_path / "out" / "results.json"))
  assert res["k"] == 2 and res["summaries"][0]["questions"] == 5


@pytest.mark.slow
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


@pytest.mark.slow
def test_tiny_vppo_runs_the_logprob_pass_with_one_mini_batch(tmp_path):
  """configs/tiny.py:vppo (gamma 0) with the full-distribution dependency: the pipeline makes masked
  copies for the visual dependency and the log-prob pass runs with one mini-batch, so the whole-batch
  advantage scale has its log-probs and the pass's per-token KL reaches the update."""
  wd = str(tmp_path / "vppo")
  r = subprocess.run([sys.executable, "-m", "papo_jax.train", f"--config={TINY}:vppo", f"--workdir={wd}",
                      "--config.train.steps=1", "--config.train.warmup_sft_steps=0", "--config.checkpoint.every=1",
                      "--config.data.batch_size=2", "--config.rollout.n=2", "--config.val.every=0",
                      "--config.algo.dapo_max_rounds=1", "--config.log.samples_every=1",
                      "--config.vppo.dependency=full_kl"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  (m,) = _metrics(wd)
  assert m["timing/logprobs"] > 0 and m["actor/gamma"] == 0.0
  assert 0.4 <= m["vppo/token_frac"] <= 1.0 and m["vppo/dependency"] > 0 and m["vppo/adv_scale_mean"] > 0
  assert np.isfinite(m["actor/loss_total"]) and m["actor/skipped_nonfinite"] == 0
  (r, *_) = _samples(wd)   # the logged dependency is the loss's: the full KL, never negative
  assert len(r["dependency"]) == len(r["tokens"]) >= 1 and min(r["dependency"]) >= 0
