"""Rollout batches for the train-step tests, built the trainer's way (rl/batching)."""

import jax
import jax.numpy as jnp
import numpy as np

import hf_utils as H
from papo_jax.rl import batching
from papo_jax.rl.train_step import TrainBatch

T = 6  # response length

ROWS = [[3, "img", 2], [4, "img", 1], [7], [2, "img", 3]]
GRIDS = [(1, 6, 8), (1, 4, 4), (1, 8, 6)]


def flat(tree) -> np.ndarray:
  """All leaves of a parameter/gradient tree as one float vector."""
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def make_groups(model, rows, grids, n: int = 1, seed: int = 0, nan_adv: bool = False) -> list[batching.Group]:
  """One group per prompt spec (as in hf_utils.make_batch) with n sampled responses each."""
  rng = np.random.default_rng(seed)
  ids, mask, pv, grid = H.make_batch(rows, grids, seed=seed, patch=model.config.vision.patch_size)
  masked_pv = pv * (rng.random(pv.shape[0]) > 0.6)[:, None]
  img_rows = [i for i, spec in enumerate(rows) for item in spec if item == "img"]
  starts = np.cumsum([0] + [t * h * w for t, h, w in grids])
  groups = []
  for i in range(len(rows)):
    imgs = [k for k, r in enumerate(img_rows) if r == i]
    p_idx = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in imgs]) if imgs else np.zeros(0, int)
    lengths = rng.integers(2, T + 1, size=n)
    adv = rng.normal(size=n).astype(np.float32)
    if nan_adv and i == 0:
      adv[0] = np.nan
    groups.append(batching.Group(
        prompt_ids=ids[i].astype(np.int32), prompt_mask=mask[i].astype(np.int32),
        pixel_values=pv[p_idx] if imgs else None, masked_pixel_values=masked_pv[p_idx] if imgs else None,
        image_grid_thw=grid[imgs].reshape(-1, 3), responses=rng.integers(30, 64, size=(n, T)),
        response_mask=(np.arange(T)[None] < lengths[:, None]).astype(np.int32), advantages=adv))
  return groups


def build_batch(model, rows, grids, micro: int, seed=0, nan_adv=False, n: int = 1, shards: int = 1) -> TrainBatch:
  """Rollouts for ``rows`` (prompt specs as in hf_utils.make_batch) split into ``micro`` micro-batches."""
  groups = make_groups(model, rows, grids, n=n, seed=seed, nan_adv=nan_adv)
  arrays = batching.assemble_train_batch(groups, micro_batches=micro, pad_id=H.PAD_ID, shards=shards,
                                         patch_multiple=16, image_multiple=2)
  return TrainBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
