"""Host-side batch assembly: row layout, per-shard distinct images, padding, errors."""

import numpy as np
import pytest

from papo_jax.rl import batching

D = 6  # patch dim


def _group(gid: int, n: int, grid=(1, 2, 4), lp: int = 5, t: int = 3, with_image=True):
  patches = int(np.prod(grid))
  pv = np.full((patches, D), gid + 1, np.float32) if with_image else None
  return batching.Group(
      prompt_ids=np.arange(lp, dtype=np.int32) + 100 * gid, prompt_mask=np.ones(lp, np.int32),
      pixel_values=pv, masked_pixel_values=None if pv is None else -pv,
      image_grid_thw=np.asarray([grid] if with_image else np.zeros((0, 3)), np.int64).reshape(-1, 3),
      responses=np.arange(n * t).reshape(n, t) + 10 * gid, response_mask=np.ones((n, t), np.int32),
      advantages=np.arange(n, dtype=np.float32) + gid)


def test_rows_group_major_and_prompts_left_padded():
  groups = [_group(0, 2, lp=5), _group(1, 2, lp=3)]
  groups[1].response_mask[1, 2] = 0
  out = batching.assemble_train_batch(groups, micro_batches=2, pad_id=-7)
  assert out["input_ids"].shape == (2, 2, 8) and out["advantages"].tolist() == [[0, 1], [1, 2]]
  # group 1's 3-token prompt is left padded to 5; its second response is padded with pad_id
  np.testing.assert_array_equal(out["attention_mask"][1, 0], [0, 0, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(out["input_ids"][1, 1, -3:], [13, 14, -7])
  np.testing.assert_array_equal(out["input_ids"][0, 1, :5], np.arange(5))


def test_shared_image_stored_once_per_shard():
  """4 groups x n=3 = 12 rows, 2 micro-batches of 6 rows, 2 shards of 3 rows: each shard's
  rows are one prompt, so each shard holds exactly that prompt's image once."""
  groups = [_group(g, 3) for g in range(4)]
  out = batching.assemble_train_batch(groups, micro_batches=2, pad_id=0, shards=2, patch_multiple=4,
                                      image_multiple=1)
  assert out["pixel_values"].shape == (2, 2, 8, D)           # 8 patches: one image per shard
  assert out["image_grid_thw"].shape == (2, 2, 1, 3)
  np.testing.assert_array_equal(out["pixel_values"][:, :, 0, 0], [[1, 2], [3, 4]])
  np.testing.assert_array_equal(out["masked_pixel_values"][:, :, 0, 0], [[-1, -2], [-3, -4]])
  np.testing.assert_array_equal(out["row_image_start"], np.zeros((2, 6)))


def test_groups_straddling_shards_and_row_image_start():
  """n=2, 3 rows per shard: shard 0 = rows (g0, g0, g1), shard 1 = (g1, g2, g2)."""
  groups = [_group(0, 2, grid=(1, 2, 2)), _group(1, 2, grid=(1, 2, 4)), _group(2, 2, grid=(1, 4, 2))]
  out = batching.assemble_train_batch(groups, micro_batches=1, pad_id=0, shards=2, patch_multiple=1,
                                      image_multiple=1)
  np.testing.assert_array_equal(out["row_image_start"], [[0, 0, 1, 0, 1, 1]])
  np.testing.assert_array_equal(out["image_grid_thw"][0, 0], [[1, 2, 2], [1, 2, 4]])
  np.testing.assert_array_equal(out["image_grid_thw"][0, 1], [[1, 2, 4], [1, 4, 2]])
  assert out["pixel_values"].shape == (1, 2, 16, D)
  np.testing.assert_array_equal(out["pixel_values"][0, 0, :, 0], [1] * 4 + [2] * 8 + [0] * 4)
  np.testing.assert_array_equal(out["pixel_values"][0, 1, :, 0], [2] * 8 + [3] * 8)


def test_image_less_rows_and_padding_buckets():
  groups = [_group(0, 1), _group(1, 1, with_image=False)]
  out = batching.assemble_train_batch(groups, micro_batches=1, pad_id=0, shards=2, patch_multiple=64,
                                      image_multiple=4, pixel_dtype="bfloat16")
  assert out["pixel_values"].shape == (1, 2, 64, D) and str(out["pixel_values"].dtype) == "bfloat16"
  assert out["image_grid_thw"].shape == (1, 2, 4, 3)
  assert not out["pixel_values"][0, 1].any() and not out["image_grid_thw"][0, 1].any()
  text_only = batching.assemble_train_batch([_group(0, 2, with_image=False)], micro_batches=1, pad_id=0)
  assert "pixel_values" not in text_only and "row_image_start" not in text_only


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="do not split into 3 micro-batches"):
    batching.assemble_train_batch([_group(0, 2)], micro_batches=3, pad_id=0)
  with pytest.raises(ValueError, match="do not split into 4 batch shards"):
    batching.assemble_train_batch([_group(0, 2)], micro_batches=1, pad_id=0, shards=4)
  bad = _group(1, 2)
  bad.pixel_values = bad.pixel_values[:3]
  with pytest.raises(ValueError, match="group 0: pixel_values has 3 patch rows"):
    batching.assemble_train_batch([bad], micro_batches=1, pad_id=0)
