"""Several processes: local shards joined into one global batch; a real two-process CPU run."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from papo_jax.data import pipeline
from papo_jax.data.tiny_tokenizer import build_tiny_checkpoint_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shard_batches(tmp_path, processes=2, per_host=3):
  ckpt = str(tmp_path / "tok")
  build_tiny_checkpoint_files(ckpt)
  batches = []
  for p in range(processes):
    cfg = pipeline.DataConfig(source="synthetic", batch_size=per_host * processes, min_pixels=56 * 56,
                              max_pixels=112 * 112, synthetic_image_size=84, max_prompt_length=256,
                              prompt_length_buckets=(128, 256), num_threads=1, process_index=p,
                              process_count=processes, synthetic_num_records=64)
    it = pipeline.make_iterator(cfg, ckpt_dir=ckpt)
    batches.append(next(it))
    it.close()
  return batches, it.processor


def test_concat_batches_gives_each_row_its_own_images(tmp_path):
  """The joined batch's logits for every row equal that row's logits in its own process's batch."""
  from flax import nnx
  from papo_jax import models
  from papo_jax.models import tiny
  batches, processor = _shard_batches(tmp_path)
  joined = pipeline.concat_batches(batches, processor.pad_token_id)
  assert joined.batch_size == sum(b.batch_size for b in batches)
  assert joined.num_images == sum(b.num_images for b in batches)
  assert joined.answers == batches[0].answers + batches[1].answers
  assert set(joined.record_ids[:3]).isdisjoint(joined.record_ids[3:])       # different shards
  # The real patches are packed first, padding after (the layout the vision tower expects).
  np.testing.assert_array_equal(joined.pixel_values[:batches[0].num_patches],
                                batches[0].pixel_values[:batches[0].num_patches])
  assert not joined.pixel_values[joined.num_patches:].any()

  ids = dict(tiny.TEST_TOKEN_IDS, vocab_size=512, image_token_id=processor.image_token_id,
             vision_start_token_id=processor.vision_start_token_id, vision_end_token_id=processor.vision_end_token_id)
  cfg = models.from_hf_dict(tiny.tiny_hf_dict(
      ids=ids, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
      mrope=(2, 2, 4), vision_depth=2, vision_hidden_size=32, vision_heads=2, vision_intermediate_size=32,
      fullatt_block_indexes=(1,)), dtype="float32")
  model = models.init_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, ids, m, pv, g: nnx.merge(graphdef, s)(ids, attention_mask=m, pixel_values=pv,
                                                                image_grid_thw=g))
  whole = np.asarray(fwd(state, joined.input_ids, joined.attention_mask, joined.pixel_values, joined.image_grid_thw))
  row = 0
  for b in batches:
    own = np.asarray(fwd(state, b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw))
    lp = b.input_ids.shape[1]
    for i in range(b.batch_size):
      valid = b.attention_mask[i].astype(bool)
      np.testing.assert_allclose(whole[row + i, -lp:][valid], own[i][valid], atol=1e-4)
    row += b.batch_size


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_run_trains_checkpoints_and_resumes(tmp_path):
  wd = str(tmp_path / "run")
  port = _free_port()
  common = ["--config=" + os.path.join(ROOT, "configs", "tiny.py"), f"--workdir={wd}",
            "--config.train.warmup_sft_steps=1", "--config.checkpoint.every=1", "--config.data.batch_size=4",
            "--config.rollout.n=2", "--config.val.every=0", "--config.log.samples_every=2"]

  def launch(steps):
    procs = []
    for p in range(2):
      env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port + steps}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p), PYTHONUNBUFFERED="1")
      env.pop("XLA_FLAGS", None)
      procs.append(subprocess.Popen([sys.executable, "-m", "papo_jax.train", *common, f"--config.train.steps={steps}"],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-4000:]
    return outs

  launch(1)
  outs = launch(2)
  assert all("resumed from step 1" in o for o in outs)
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2]               # process 0 alone writes metrics, each step once
  # step 2's samples carry the visual dependency of a pass that every process ran
  samples = [json.loads(line) for line in open(os.path.join(wd, "samples.jsonl"))]
  assert {r["step"] for r in samples} == {2} and all(len(r["dependency"]) == len(r["tokens"]) >= 1 for r in samples)
  assert os.path.exists(os.path.join(wd, "samples", "step_2", "dependency.json"))
  meta = json.load(open(os.path.join(wd, "checkpoints", "2", "meta", "metadata")))
  shards = meta["data_per_process"]
  assert [s["process_index"] for s in shards] == [0, 1] and all(s["process_count"] == 2 for s in shards)
  # Each process read 2 prompts per step of the global 4: its own position advanced by 2 per batch.
  assert all(s["grain"]["next_index"] == shards[0]["grain"]["next_index"] for s in shards)
