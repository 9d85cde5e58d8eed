"""Shared test helpers: tiny random transformers models and matching inputs for parity tests (torch, CPU),
small benchmark files."""

from __future__ import annotations

import numpy as np

from papo_jax.models import tiny

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = (tiny.TEST_TOKEN_IDS[k] for k in (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))
BOS_ID, EOS_ID, PAD_ID = (tiny.TEST_TOKEN_IDS[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id"))


def _ids(vocab: int) -> dict:
  return dict(tiny.TEST_TOKEN_IDS, vocab_size=vocab)


def tiny_hf_config(tie: bool = True, vocab: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2,
                   depth: int = 3, fullatt=(1,), mrope=(2, 3, 3)):
  return tiny.to_transformers_config(tiny.tiny_hf_dict(
      "qwen2_5_vl", ids=_ids(vocab), hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv, vision_depth=depth, vision_hidden_size=64, vision_heads=4,
      vision_intermediate_size=80, vision_hidden_act="silu", mrope=mrope, fullatt_block_indexes=fullatt,
      max_position_embeddings=512, tie_word_embeddings=tie))


def tiny_hf_model(seed: int = 0, **kw):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  cfg = tiny_hf_config(**kw)
  model = Qwen2_5_VLForConditionalGeneration(cfg).eval().float()
  # Random (not all-ones) norm weights and biases, so their layout is checked too.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.05 * torch.randn_like(p))
  model.config._attn_implementation = "eager"
  model.set_attn_implementation("eager")
  return model


def tiny_qwen3_hf_config(tie: bool = True, vocab: int = 64, hidden: int = 64, layers: int = 3, heads: int = 4,
                         kv: int = 2, depth: int = 4, deepstack=(0, 2), table: int = 16, mrope=(4, 2, 2)):
  """Qwen3-VL with a ``table``-entry (sqrt(table) per side) position table and DeepStack from ``deepstack``."""
  return tiny.to_transformers_config(tiny.tiny_hf_dict(
      "qwen3_vl", ids=_ids(vocab), hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv, head_dim=2 * sum(mrope), vision_depth=depth,
      vision_hidden_size=64, vision_heads=4, vision_intermediate_size=80, mrope=mrope,
      deepstack_visual_indexes=deepstack, position_table=table, max_position_embeddings=512,
      tie_word_embeddings=tie))


def tiny_qwen3_hf_model(seed: int = 0, **kw):
  import torch
  from transformers import Qwen3VLForConditionalGeneration
  torch.manual_seed(seed)
  model = Qwen3VLForConditionalGeneration(tiny_qwen3_hf_config(**kw)).eval().float()
  # Random (not 1 / 0) norm weights, norm biases and biases, so their layout is checked too;
  # larger random position-table rows, so the interpolation shows in the logits.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith(".weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.05 * torch.randn_like(p))
      elif name.endswith("pos_embed.weight"):
        p.copy_(torch.randn_like(p))
  model.set_attn_implementation("eager")
  return model


def make_batch(rows, grids, seed: int = 0, vocab: int = 64, merge: int = 2, patch: int = 14):
  """rows: list of row specs, each a list of items: int (that many text tokens) or 'img' (next grid).

  Returns numpy input_ids [B, L] (left padded), attention_mask, pixel_values [N, 3*2*patch*patch],
  image_grid_thw [I, 3].
  """
  rng = np.random.default_rng(seed)
  seqs = []
  gi = 0
  for spec in rows:
    seq = []
    for item in spec:
      if item == "img":
        t, h, w = grids[gi]
        gi += 1
        seq += [VSTART_ID] + [IMAGE_ID] * (t * h * w // merge ** 2) + [VEND_ID]
      else:
        seq += list(rng.integers(30, vocab, size=item))
    seqs.append(seq)
  length = max(len(s) for s in seqs)
  ids = np.full((len(seqs), length), PAD_ID, np.int64)
  mask = np.zeros((len(seqs), length), np.int64)
  for i, s in enumerate(seqs):
    ids[i, length - len(s):] = s
    mask[i, length - len(s):] = 1
  n = sum(t * h * w for t, h, w in grids)
  pixel_values = rng.normal(size=(n, 3 * 2 * patch * patch)).astype(np.float32)
  grid = np.asarray(grids, np.int64).reshape(-1, 3)
  return ids, mask, pixel_values, grid


def hf_forward(model, ids, mask, pixel_values, grid):
  """HF logits [B, L, V] (float32 numpy) plus its position ids and rope deltas."""
  import torch
  ti = torch.as_tensor(ids)
  tm = torch.as_tensor(mask)
  kwargs = dict(input_ids=ti, attention_mask=tm, mm_token_type_ids=(ti == IMAGE_ID).long())
  if len(grid):
    kwargs.update(pixel_values=torch.as_tensor(pixel_values), image_grid_thw=torch.as_tensor(grid))
  with torch.no_grad():
    pos, deltas = model.model.get_rope_index(ti, (ti == IMAGE_ID).long(),
                                             image_grid_thw=torch.as_tensor(grid) if len(grid) else None,
                                             attention_mask=tm)
    out = model(**kwargs)
  return out.logits.float().numpy(), pos.numpy(), deltas.numpy()


def write_geometry3k(root: str, n: int = 5) -> str:
  """A small ``geometry3k`` benchmark in its published layout (parquet, one image each) under ``root``."""
  import os
  from papo_jax.data import testing
  os.makedirs(os.path.join(root, "geometry3k"), exist_ok=True)
  testing.write_parquet(os.path.join(root, "geometry3k", "test.parquet"),
                        [dict(problem=f"<image>Find x. ({i})", answer=str(i + 2),
                              images=[testing.encode(testing.natural_image(56, 56, i))]) for i in range(n)])
  return root
