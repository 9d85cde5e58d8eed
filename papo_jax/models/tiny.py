"""Tiny random Qwen-VL configurations and checkpoints (CPU demo, benches, tests).

One builder, :func:`tiny_hf_dict`, writes the ``config.json`` content of a small
Qwen2.5-VL or Qwen3-VL in the nested Hugging Face layout (``text_config`` +
``vision_config``), which both :func:`papo_jax.models.from_hf_dict` and transformers'
``Qwen2_5_VLConfig(**d)`` / ``Qwen3VLConfig(**d)`` read. :func:`build_tiny_checkpoint`
turns it into a loadable checkpoint directory (weights, config, tokenizer, processor).
"""

from __future__ import annotations

import os
from typing import Any

# Token ids of the parity tests' tiny vocabularies (the trainer passes the tokenizer's own).
TEST_TOKEN_IDS = dict(vocab_size=64, image_token_id=20, video_token_id=21, vision_start_token_id=22,
                      vision_end_token_id=23, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def mrope_section(head_dim: int) -> list[int]:
  """A valid [t, h, w] M-RoPE split of head_dim/2 rotary pairs (t the smallest)."""
  half = head_dim // 2
  t = half // 4
  h = (half - t) // 2
  return [t, h, half - t - h]


def tiny_hf_dict(family: str = "qwen2_5_vl", *, ids: dict | None = None, hidden_size: int = 64,
                 intermediate_size: int = 128, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                 num_key_value_heads: int = 2, head_dim: int | None = None, vision_depth: int = 2,
                 vision_hidden_size: int = 32, vision_heads: int = 2, vision_intermediate_size: int = 64,
                 vision_hidden_act: str | None = None, mrope: list[int] | tuple[int, ...] | None = None,
                 fullatt_block_indexes=None, deepstack_visual_indexes=None, position_table: int = 16,
                 max_position_embeddings: int = 4096, tie_word_embeddings: bool = True,
                 rope_theta: float | None = None) -> dict[str, Any]:
  """config.json content of a tiny random model of ``family`` (nested HF layout).

  Defaults: Qwen2.5-VL with one full-attention vision block (the last); Qwen3-VL with
  DeepStack from vision blocks 0.. into as many decoder layers (at most 3) and a
  ``position_table``-entry learned position table. ``ids``: the token ids and vocab size
  (``TEST_TOKEN_IDS`` when None).
  """
  if family not in FAMILIES:
    raise ValueError(f"tiny model family {family!r} is not one of {FAMILIES}")
  ids = dict(TEST_TOKEN_IDS if ids is None else ids)
  qwen3 = family == "qwen3_vl"
  hd = head_dim or hidden_size // num_attention_heads
  special = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  rope = {"rope_type": "default", "rope_theta": rope_theta or (5e6 if qwen3 else 1e6),
          "mrope_section": list(mrope) if mrope is not None else mrope_section(hd)}
  if qwen3:
    rope["mrope_interleaved"] = True
  text = dict(vocab_size=ids["vocab_size"], hidden_size=hidden_size, intermediate_size=intermediate_size,
              num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
              num_key_value_heads=num_key_value_heads, rms_norm_eps=1e-6,
              max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
              rope_parameters=rope, **special)
  vision = dict(depth=vision_depth, hidden_size=vision_hidden_size, num_heads=vision_heads,
                intermediate_size=vision_intermediate_size, out_hidden_size=hidden_size, spatial_merge_size=2,
                temporal_patch_size=2)
  if qwen3:
    text.update(head_dim=hd, attention_bias=False)
    deepstack = (list(range(min(vision_depth, num_hidden_layers, 3))) if deepstack_visual_indexes is None
                 else list(deepstack_visual_indexes))
    vision.update(hidden_act=vision_hidden_act or "gelu_pytorch_tanh", patch_size=16,
                  num_position_embeddings=position_table, deepstack_visual_indexes=deepstack)
  else:
    fullatt = [vision_depth - 1] if fullatt_block_indexes is None else list(fullatt_block_indexes)
    vision.update(patch_size=14, window_size=112, tokens_per_second=2, fullatt_block_indexes=fullatt)
    if vision_hidden_act:
      vision["hidden_act"] = vision_hidden_act
  top = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
  return dict(model_type=family, tie_word_embeddings=tie_word_embeddings, text_config=text, vision_config=vision,
              **top, **({} if qwen3 else special))


def tiny_model_config(tiny: Any, ids: dict) -> dict[str, Any]:
  """:func:`tiny_hf_dict` from a run config's ``model.tiny`` group."""
  return tiny_hf_dict(
      tiny.family, ids=ids, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
      num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
      num_key_value_heads=tiny.num_key_value_heads, vision_depth=tiny.vision_depth,
      vision_hidden_size=tiny.vision_hidden_size, vision_heads=tiny.vision_heads,
      vision_intermediate_size=tiny.vision_intermediate_size)


def build_tiny_checkpoint(path: str, tiny: Any, *, min_pixels: int | None = None,
                          max_pixels: int | None = None) -> str:
  """Writes a tiny random checkpoint (weights, config, tokenizer, processor) of ``tiny.family`` once.

  ``tiny``: a run config's ``model.tiny`` group (sizes, ``family``, ``seed``). An existing
  ``model.safetensors`` in ``path`` is kept, so reruns and resumes see the same model.
  """
  from papo_jax.data import tiny_tokenizer
  from papo_jax.models.checkpoint import init_model, save_pretrained
  from papo_jax.models.config import from_hf_dict
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return path
  ids = tiny_tokenizer.build_tiny_checkpoint_files(path, min_pixels=min_pixels or None,
                                                   max_pixels=max_pixels or None, family=tiny.family)
  cfg = from_hf_dict(tiny_model_config(tiny, ids), dtype="float32", param_dtype="float32")
  save_pretrained(init_model(cfg.replace(hf_dict=None), seed=tiny.seed), path)
  return path


def to_transformers_config(hf: dict[str, Any]):
  """The transformers config object of a :func:`tiny_hf_dict` (``Qwen2_5_VLConfig`` / ``Qwen3VLConfig``)."""
  import transformers
  cls = transformers.Qwen3VLConfig if hf["model_type"] == "qwen3_vl" else transformers.Qwen2_5_VLConfig
  return cls(**{k: v for k, v in hf.items() if k != "model_type"})
