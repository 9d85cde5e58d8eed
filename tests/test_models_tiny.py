"""The one tiny-model builder: configs both transformers and our loader read, checkpoints that load."""

import json
import os

import ml_collections
import numpy as np
import pytest

from papo_jax import models
from papo_jax.models import tiny
from papo_jax.models.limits import max_image_patches


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tiny_config_reads_the_same_in_transformers_and_ours(family):
  pytest.importorskip("transformers")
  d = tiny.tiny_hf_dict(family)
  ours = models.from_hf_dict(d)
  theirs = models.from_hf_dict(tiny.to_transformers_config(d).to_dict())
  assert ours.replace(hf_dict=None) == theirs.replace(hf_dict=None)
  assert ours.text.hidden_size == 64 and ours.vision.depth == 2 and ours.image_token_id == 20
  assert sum(ours.text.mrope_section) * 2 == ours.text.head_dim
  if family == "qwen3_vl":
    assert ours.vision.deepstack_visual_indexes == (0, 1) and ours.vision.patch_size == 16
  else:
    assert ours.vision.fullatt_block_indexes == (1,) and ours.vision.patch_size == 14


def test_mrope_section_splits_half_the_head():
  for hd in (8, 16, 32, 64, 128):
    t, h, w = tiny.mrope_section(hd)
    assert t + h + w == hd // 2 and min(t, h, w) >= 0


def test_build_tiny_checkpoint_once_and_load(tmp_path):
  t = ml_collections.ConfigDict(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vision_depth=1, vision_hidden_size=16, vision_heads=1,
                                     vision_intermediate_size=32, seed=3, family="qwen2_5_vl"))
  path = str(tmp_path / "m")
  tiny.build_tiny_checkpoint(path, t, min_pixels=56 * 56, max_pixels=56 * 56)
  first = os.path.getmtime(os.path.join(path, "model.safetensors"))
  tiny.build_tiny_checkpoint(path, t)                    # kept, not rebuilt
  assert os.path.getmtime(os.path.join(path, "model.safetensors")) == first
  with open(os.path.join(path, "preprocessor_config.json")) as f:
    assert json.load(f)["max_pixels"] == 56 * 56
  model = models.from_pretrained(path, dtype="float32", param_dtype="float32")
  assert model.config.text.hidden_size == 32 and model.config.text.num_hidden_layers == 1
  ids = np.array([[1, 30, 31]])
  assert np.isfinite(np.asarray(model(ids))).all()


def test_max_image_patches():
  assert max_image_patches(56 * 56, 14) == 16
  assert max_image_patches(1003520, 14) == 5120
  assert max_image_patches(0, 14) == 0
