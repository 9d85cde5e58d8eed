"""NoisyRollout in the trainer: distorted pixels from the data pipeline reach the sampler (the last
noisy.rollouts rollouts of every group) and never the update; strengths follow the RL step and resume."""

import concurrent.futures
import importlib.util
import json
import os
import types

import jax
import numpy as np
import pytest

from papo_jax import metrics as metrics_lib
from papo_jax import train as T
from papo_jax.config_base import ConfigError, noisy_rollouts, validate_config
from papo_jax.data import images as images_lib
from papo_jax.data import masking, noise, pipeline
from papo_jax.data import processor as proc_lib
from papo_jax.data import testing, tiny_tokenizer
from papo_jax.rl import advantages as adv_lib
from papo_jax.rl import batching
from papo_jax.rollouts import sample_group_texts, sample_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(variant="noisy_rollout"):
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


# ============================================================================================
# Config
# ============================================================================================

def test_tiny_variants_are_valid_and_split_the_group():
  for variant in ("noisy_rollout", "papo_noisy", "qwen3_noisy_rollout"):
    c = tiny(variant)
    validate_config(c)
    assert (c.rollout.n, noisy_rollouts(c)) == (8, 4)
  c = tiny("papo_g")
  assert not c.noisy.enabled and noisy_rollouts(c) == 0
  assert T.train_data_config(c).noise.enabled is False
  c = tiny("noisy_rollout")
  cfg = T.train_data_config(c).noise
  assert cfg.enabled and (cfg.strength, cfg.decay_mode, cfg.decay_coef, cfg.mid_step) == (500, "sigmoid", 30.0, 40.0)
  assert (cfg.total_steps, cfg.prompts_per_step) == (c.train.steps, c.data.batch_size)
  assert cfg.warmup_batches == c.train.warmup_sft_steps > 0   # the format warm-up reads batches before RL step 0


@pytest.mark.parametrize("field,value", [
    ("rollouts", 0), ("rollouts", 8), ("rollouts", -1),   # every group needs clean and noisy rollouts
    ("strength", 1000), ("strength", -1), ("decay_mode", "cosine")])
def test_error_names_the_noisy_field(field, value):
  c = tiny()
  c.noisy[field] = value
  with pytest.raises(ConfigError, match=rf"noisy\.{field}"):
    validate_config(c)
  c.noisy.enabled = False   # off: the group's values are not read
  validate_config(c)


# ============================================================================================
# Data pipeline: the distorted copy, its key, its strength by step, resume
# ============================================================================================

@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tiny_ckpt"))
  tiny_tokenizer.build_tiny_checkpoint_files(d, max_pixels=28 * 28 * 64)
  return proc_lib.Processor.from_pretrained(d)


def _source(n=24, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    k = int(rng.integers(1, 3))
    imgs = [testing.encode(testing.natural_image(int(rng.integers(30, 120)), int(rng.integers(30, 120)), i * 3 + j))
            for j in range(k)]
    rows.append({"problem": "<image>" * k + " what" * int(rng.integers(0, 8)), "answer": str(i), "images": imgs})
  return testing.ListSource(rows, "noisy")


def _cfg(noise_cfg=None, **kw):
  base = dict(batch_size=4, max_prompt_length=512, prompt_length_buckets=(128, 256), patch_buckets=(512, 1024, 2048),
              image_buckets=(4, 8, 16), num_threads=2, prefetch_batches=0, seed=5, process_index=0, process_count=1,
              noise=noise_cfg or noise.NoiseConfig(enabled=True, strength=300, decay_mode="none"))
  base.update(kw)
  return pipeline.DataConfig(**base)


def _batches(cfg, processor, count, source=None):
  it = pipeline.PromptBatchIterator(cfg, processor, source or _source())
  out = [next(it) for _ in range(count)]
  it.close()
  return out


def _recompute_noisy(processor, record_id, strength, *, seed, step):
  """The distorted pixels of one record by the processor's own path: decode, resize, distort, process."""
  rec = _source().record(record_id)
  imgs = [images_lib.decode_image(x) for x in rec["images"]]
  noisy = [noise.distort_image(proc_lib.resize_image(im, processor.image), strength,
                               noise.noise_rng(seed, step, record_id, k)) for k, im in enumerate(imgs)]
  return processor(rec["problem"], noisy)["pixel_values"]   # already sized: the processor's resize is a no-op


def test_noisy_copy_sits_next_to_the_clean_and_masked_ones(processor):
  with_noise = _batches(_cfg(), processor, 2)
  without = _batches(_cfg(noise_cfg=noise.NoiseConfig(enabled=False)), processor, 2)
  for a, b in zip(with_noise, without):
    assert b.noisy_pixel_values is None and "noise_strength" not in b.stats
    for f in ("input_ids", "attention_mask", "pixel_values", "masked_pixel_values", "image_grid_thw", "record_ids"):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)   # the clean and masked copies as before
    n = a.num_patches
    assert a.noisy_pixel_values.shape == a.pixel_values.shape and a.noisy_pixel_values.dtype == np.float32
    assert (a.noisy_pixel_values[n:] == 0).all()
    assert np.abs(a.noisy_pixel_values[:n] - a.pixel_values[:n]).mean() > 0.1   # strength 300 is visible
    assert a.stats["noise_strength"] == 300
  # Key (seed, batch index, record id, image index), like the mask's, on a stream of its own.
  b = with_noise[1]
  row = 0
  for i, rid in enumerate(b.record_ids):
    want = _recompute_noisy(processor, int(rid), 300, seed=5, step=1)
    np.testing.assert_array_equal(b.noisy_pixel_values[row:row + len(want)], want, err_msg=f"prompt {i}")
    row += len(want)
  assert row == b.num_patches
  assert (noise.noise_rng(5, 1, 3, 0).random(4) != masking.mask_rng(5, 1, 3, 0).random(4)).all()


@pytest.mark.parametrize("batch_size,prompts_per_step,warmup", [
    (4, 4, 0),   # one batch a step
    (2, 4, 0),   # DAPO: chunks of half a step's prompts
    (4, 4, 2)])  # two batches read by a warm-up before RL step 0
def test_strength_follows_the_step_that_consumes_the_batch(processor, batch_size, prompts_per_step, warmup):
  cfg_noise = noise.NoiseConfig(enabled=True, strength=500, decay_mode="sigmoid", decay_coef=30.0, mid_step=2.0,
                                total_steps=6, prompts_per_step=prompts_per_step, warmup_batches=warmup)
  batches = _batches(_cfg(cfg_noise, batch_size=batch_size), processor, 6)
  got = [b.stats["noise_strength"] for b in batches]
  per = prompts_per_step // batch_size
  # their t = int(500 * (1 - sigmoid(30 * (step / 6 - 2 / 6)))) at RL step (1-based) = (batch - warmup) // per + 1
  want = [int(500 * (1 - 1 / (1 + np.exp(-30 * (((max(i - warmup, 0)) // per + 1) / 6 - 2 / 6))))) for i in range(6)]
  assert got == want and got[0] > 400 and got[-1] <= 10
  last = batches[-1]   # the pixels carry that strength: weaker noise late in training
  rid = int(last.record_ids[0])
  want_pv = _recompute_noisy(processor, rid, got[-1], seed=5, step=5)
  np.testing.assert_array_equal(last.noisy_pixel_values[:len(want_pv)], want_pv)
  assert (np.abs(batches[0].noisy_pixel_values - batches[0].pixel_values).mean()
          > 3 * np.abs(last.noisy_pixel_values - last.pixel_values).mean())


def test_resume_draws_the_same_noise(processor):
  cfg_noise = noise.NoiseConfig(enabled=True, strength=500, decay_mode="linear", total_steps=8)
  cfg = _cfg(cfg_noise, prefetch_batches=2)
  ref = _batches(cfg, processor, 7)   # 28 records > 24: crosses an epoch boundary
  it = pipeline.PromptBatchIterator(cfg, processor, _source())
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  next(it)
  it.close()
  resumed = pipeline.PromptBatchIterator(cfg, processor, _source())
  resumed.set_state(state)
  for want in ref[3:]:
    got = next(resumed)
    assert got.stats["noise_strength"] == want.stats["noise_strength"]
    np.testing.assert_array_equal(got.noisy_pixel_values, want.noisy_pixel_values)
    np.testing.assert_array_equal(got.pixel_values, want.pixel_values)
  resumed.close()
  assert len({b.stats["noise_strength"] for b in ref}) == 7   # linear decay: a new strength every step


def test_concat_batches_keeps_each_rows_noisy_images(processor):
  parts = [_batches(_cfg(process_index=p, process_count=2), processor, 1)[0] for p in range(2)]
  joined = pipeline.concat_batches(parts, processor.pad_token_id)
  n0 = parts[0].num_patches
  np.testing.assert_array_equal(joined.noisy_pixel_values[:n0], parts[0].noisy_pixel_values[:n0])
  np.testing.assert_array_equal(joined.noisy_pixel_values[n0:joined.num_patches],
                                parts[1].noisy_pixel_values[:parts[1].num_patches])
  assert joined.stats["noise_strength"] == 300   # the same on every process, not summed


# ============================================================================================
# Rollouts: which rows see which pixels
# ============================================================================================

class _SpySampler:
  """Each prompt has one image whose pixels are all +(i + 1) (clean) or -(i + 1) (noisy); response j of a
  prompt is [100 + 10 * pixel value + j, 7]: the pixels each row was generated from, readable from its tokens."""

  def __init__(self):
    self.calls = []

  def generate(self, params, ids, mask, pv, grid, n, key):
    self.calls.append((ids.shape[0], n, jax.random.key_data(key).tolist()))
    starts = np.concatenate([[0], np.cumsum(np.asarray(grid).prod(-1))])[:ids.shape[0]]
    seen = np.asarray(pv)[starts, 0]
    toks = np.stack([np.repeat(100 + 10 * seen, n) + np.tile(np.arange(n), ids.shape[0]), np.full(ids.shape[0] * n, 7)],
                    axis=1).astype(np.int64)
    return types.SimpleNamespace(tokens_RxT=toks, mask_RxT=np.ones_like(toks))


class _Tok:
  def decode(self, ids, skip_special_tokens=False):
    return " ".join(str(int(i)) for i in ids)


def _image_batch(b, noisy_scale=1.0, patches=4, answers=None):
  """B prompts with one 2x2-patch image each; clean pixels +(i+1), noisy -(i+1) in column 0 (what the spy
  reads) and -(i+1) * noisy_scale elsewhere (a different noise that leaves the responses as they are)."""
  pv = np.repeat(np.arange(1, b + 1, dtype=np.float32), patches)[:, None] * np.ones((1, 6), np.float32)
  scale = np.asarray([1.0] + [noisy_scale] * 5, np.float32)
  pad = np.zeros((4, 6), np.float32)
  return types.SimpleNamespace(
      input_ids=np.arange(b * 5).reshape(b, 5) % 40 + 30, attention_mask=np.ones((b, 5), np.int32),
      pixel_values=np.concatenate([pv, pad]), masked_pixel_values=np.concatenate([pv * 0.5, pad]),
      noisy_pixel_values=np.concatenate([-pv * scale, pad]),
      image_grid_thw=np.concatenate([np.tile([[1, 2, 2]], (b, 1)), np.zeros((2, 3), int)]),
      image_counts=np.ones(b, int), num_images=b, answers=list(answers or [str(i) for i in range(b)]),
      problems=[f"q{i}" for i in range(b)], batch_size=b, stats={"batch_index": 0, "noise_strength": 123})


@pytest.mark.parametrize("n,n_noisy,calls", [(4, 2, 1), (5, 2, 2), (3, 1, 2)])
@pytest.mark.parametrize("chunk", [0, 2])
def test_each_group_is_its_clean_rows_then_its_noisy_rows(n, n_noisy, calls, chunk):
  b = 3
  sampler = _SpySampler()
  toks, mask, texts = sample_group_texts(sampler, None, _image_batch(b), n=n, n_noisy=n_noisy, key=jax.random.key(4),
                                         tokenizer=_Tok(), stop_ids=(7,), chunk_prompts=chunk)
  assert toks.shape == (b * n, 2) and mask.shape == toks.shape and len(texts) == b * n
  seen = (toks[:, 0] - 100) // 10   # the pixel value each row was generated from (floor: the sample index)
  want = np.concatenate([[p + 1] * (n - n_noisy) + [-(p + 1)] * n_noisy for p in range(b)])
  np.testing.assert_array_equal(seen, want)
  np.testing.assert_array_equal(noise.rollout_split(b, n - n_noisy, n_noisy), want < 0)
  assert texts == [str(int(t)) for t in toks[:, 0]]   # texts follow their rows
  # Equal counts: one call over 2B prompts; otherwise one per side with its count, on keys of their own.
  per_call = [(rows, k) for rows, k, _ in sampler.calls]
  if calls == 1:
    assert sum(r for r, _ in per_call) == 2 * b and {k for _, k in per_call} == {n - n_noisy}
  else:
    assert sum(r for r, _ in per_call) == 2 * b and {k for _, k in per_call} == {n - n_noisy, n_noisy}
    if not chunk:
      assert sampler.calls[0][2] != sampler.calls[1][2]


def test_without_noisy_rollouts_it_is_sample_texts():
  kw = dict(key=jax.random.key(1), tokenizer=_Tok(), stop_ids=(7,))
  got = sample_group_texts(_SpySampler(), None, _image_batch(2), n=3, n_noisy=0, **kw)
  want = sample_texts(_SpySampler(), None, _image_batch(2), n=3, **kw)
  np.testing.assert_array_equal(got[0], want[0])
  assert ((got[0][:, 0] - 100) // 10 > 0).all()   # no row saw the noisy pixels
  batch = _image_batch(2)
  batch.noisy_pixel_values = None
  with pytest.raises(ValueError, match="noisy_pixel_values"):
    sample_group_texts(_SpySampler(), None, batch, n=4, n_noisy=2, **kw)


def test_noisy_rows_are_what_the_sampler_generates_on_the_noisy_image():
  """The real tiny sampler, greedy: a group's clean rows equal a direct generate on the clean images, its
  noisy rows a direct generate on the noisy ones."""
  import hf_utils as H
  from flax import nnx
  from papo_jax import models
  from papo_jax.sampling import Sampler, SamplingConfig
  hf = H.tiny_hf_config(tie=False, layers=1, depth=2)   # small: two compiled shapes on a CPU
  model = models.init_model(models.from_hf_dict(hf.to_dict(), dtype="float32").replace(hf_dict=None), seed=3)
  graphdef, state = nnx.split(model)
  sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=4, greedy=True, cache_dtype="float32",
                                             stop_token_ids=(H.tiny_hf_config().text_config.vocab_size - 1,)))
  grids = [(1, 4, 4), (1, 4, 8), (1, 8, 4)]
  ids, mask, pv, grid = H.make_batch([[5, "img", 7], [3, "img", 4], [2, "img", 3]], grids, seed=2)
  pv = np.asarray(pv)
  noisy_pv = pv + 3.0 * np.random.default_rng(0).standard_normal(pv.shape).astype(np.float32)
  batch = types.SimpleNamespace(input_ids=np.asarray(ids), attention_mask=np.asarray(mask), pixel_values=pv,
                                noisy_pixel_values=noisy_pv,
                                image_grid_thw=np.asarray(grid), image_counts=np.ones(3, int), num_images=3)
  kw = dict(key=0, tokenizer=_Tok(), stop_ids=())
  clean = sample_texts(sampler, state, batch, n=1, **kw)[0]
  noisy_batch = types.SimpleNamespace(**{**vars(batch), "pixel_values": batch.noisy_pixel_values})
  noisy = sample_texts(sampler, state, noisy_batch, n=1, **kw)[0]
  assert (clean != noisy).any(), "the noisy image must change some greedy response for this test to mean anything"
  # 2 + 2 rollouts: one call over the clean and noisy copies packed together (the spy tests cover uneven counts).
  toks = sample_group_texts(sampler, state, batch, n=4, n_noisy=2, **kw)[0].reshape(3, 4, -1)
  for p in range(3):
    for j in range(4):
      np.testing.assert_array_equal(toks[p, j], (clean if j < 2 else noisy)[p], err_msg=f"prompt {p}, row {j}")


# ============================================================================================
# The trainer: mixed groups, one baseline, clean images only in the update, metrics
# ============================================================================================

def _noisy_reward(texts, answers):
  """1 for a response generated on noisy pixels (its first token encodes a negative pixel value)."""
  r = np.asarray([float(int(t.split()[0]) < 100) for t in texts], np.float32)
  return {"overall": r, "accuracy": r, "format": np.ones_like(r)}


def _fake_run(c, batches):
  return T.Run(c=c, mesh=None, graphdef=None, model_config=types.SimpleNamespace(max_image_patches=64),
               it=iter(batches), tokenizer=_Tok(),
               sampler=_SpySampler(), reward_fn=_noisy_reward, grader=concurrent.futures.ThreadPoolExecutor(1),
               train_step=None, logprob_pass=None, stop_ids=(7,), pad_id=0)


def _small(variant="noisy_rollout", **algo):
  c = tiny(variant)
  c.rollout.n, c.noisy.rollouts = 5, 2   # unequal: 3 clean + 2 noisy
  c.data.batch_size = 3
  c.algo.update(algo)
  return c


def test_collected_groups_mix_clean_and_noisy_rows_under_one_baseline():
  c = _small()
  n, k = c.rollout.n, c.noisy.rollouts
  col = T.collect_groups(_fake_run(c, [_image_batch(3)]), None, step=0)
  rewards, _ = col.rewards.result()
  split = noise.rollout_split(3, n - k, k)
  np.testing.assert_array_equal(rewards["overall"], split.astype(np.float32))   # noisy rows really saw noise
  assert [len(g.responses) for g in col.groups] == [n] * 3 and len(col.samples) == 3 * n
  # One baseline over the group of n (papo.md §4): float64 reference with the unbiased std.
  adv = adv_lib.group_advantages(rewards["overall"], group_size=n)
  r = split.reshape(3, n).astype(np.float64)
  want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(adv.reshape(3, n), want, rtol=1e-5)
  assert (adv[split] > 0).all() and (adv[~split] < 0).all()
  row = metrics_lib.noisy_metrics(rewards, c, col.stats)
  assert row == {"noisy/reward_clean": 0.0, "noisy/reward_noisy": 1.0, "noisy/accuracy_clean": 0.0,
                 "noisy/accuracy_noisy": 1.0, "noisy/strength": 123.0}


def test_the_update_sees_the_clean_images_only_whatever_the_noise():
  """Same responses, different noisy pixels: the TrainBatch (hence old/ref/masked log-probs, loss and
  gradient) is the same array for array, and its images are the clean ones."""
  c = _small()
  arrays = []
  for scale in (1.0, 7.0):
    col = T.collect_groups(_fake_run(c, [_image_batch(3, noisy_scale=scale)]), None, step=0)
    for g, p in zip(col.groups, range(3)):
      np.testing.assert_array_equal(g.pixel_values, np.full((4, 6), p + 1, np.float32))
      np.testing.assert_array_equal(g.masked_pixel_values, np.full((4, 6), 0.5 * (p + 1), np.float32))
    arrays.append(batching.assemble_train_batch(col.groups, micro_batches=3, pad_id=0, shards=1, patch_multiple=4,
                                                image_multiple=1))
  a, b = arrays
  assert set(a) == set(b) and "noisy_pixel_values" not in a
  for f in a:
    np.testing.assert_array_equal(a[f], b[f], err_msg=f)
  assert (a["pixel_values"] > 0).all() and (a["masked_pixel_values"] > 0).all()   # no negative (noisy) value
  np.testing.assert_array_equal(np.unique(a["pixel_values"]), [1.0, 2.0, 3.0])


def test_dapo_keeps_mixed_groups_and_metrics_follow_the_kept_rows():
  c = _small(dynamic_sampling=True, dapo_chunk=3, dapo_max_rounds=2)
  c.data.batch_size = 2
  col = T.collect_groups(_fake_run(c, [_image_batch(3), _image_batch(3)]), None, step=0)
  rewards, _ = col.rewards.result()
  assert len(col.groups) == 2 and col.rounds == 1   # every mixed group has accuracy 2/5: informative
  row = metrics_lib.step_row([{"actor/pg_loss": 0.0}], rewards, col.groups, {}, col.stats, c, 0.0, 1.0)
  assert (row["noisy/reward_clean"], row["noisy/reward_noisy"], row["noisy/strength"]) == (0.0, 1.0, 123.0)
  c.noisy.enabled = False
  assert not any(k.startswith("noisy/") for k in metrics_lib.step_row(
      [{"actor/pg_loss": 0.0}], rewards, col.groups, {}, col.stats, c, 0.0, 1.0))
