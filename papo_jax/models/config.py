"""Model configs read from (and written back to) Hugging Face ``config.json`` files.

Qwen2.5-VL hub configs are "flat" (text fields at the root, ``rope_scaling`` with
``mrope_section``); transformers v5 writes them nested (``text_config``,
``rope_parameters``). Both are accepted; the original dict is kept so that a
loaded checkpoint is written back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  window_size: int = 112
  out_hidden_size: int = 2048
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  hidden_act: str = "silu"
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

  @property
  def window_merged(self) -> int:
    """Window side in merged tokens (112 // 2 // 14 = 4)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_hidden_layers: int = 36
  num_attention_heads: int = 16
  num_key_value_heads: int = 2
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the Flax model needs, plus run-time choices (dtypes, remat, attention)."""
  vision: VisionConfig
  text: TextConfig
  model_type: str = "qwen2_5_vl"
  tie_word_embeddings: bool = True
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151645
  pad_token_id: int | None = None
  # Run-time (not in config.json):
  dtype: str = "float32"        # compute dtype of activations
  param_dtype: str = "float32"  # storage dtype of parameters
  remat: bool = False           # rematerialise each decoder / vision block in backward
  attention: str = "xla"        # attention backend: auto | xla | cudnn | pallas_tpu (models/attention.py)
  attention_block: int = 512    # Pallas TPU splash block size (queries and keys)
  # Vision full-attention layers attend per image, each padded to this many patches
  # (memory linear in images); 0: one segment-masked sequence over all patches.
  max_image_patches: int = 0
  hf_dict: Any = dataclasses.field(default=None, compare=False, repr=False)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def _pick(d: dict, key: str, default):
  v = d.get(key, default)
  return default if v is None else v


def from_hf_dict(cfg: dict[str, Any], **runtime) -> ModelConfig:
  """Builds a ModelConfig from a parsed ``config.json`` (flat or nested layout)."""
  model_type = cfg.get("model_type", "qwen2_5_vl")
  if model_type not in ("qwen2_5_vl",):
    raise ValueError(f"config.json: model_type {model_type!r} is not supported (expected 'qwen2_5_vl')")
  text = dict(cfg.get("text_config") or {})
  # Flat layout: text fields at the root; nested values take precedence.
  root_text = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
  t = {**root_text, **text}
  rope = t.get("rope_parameters") or t.get("rope_scaling") or cfg.get("rope_scaling") or {}
  rope_theta = _pick(rope, "rope_theta", _pick(t, "rope_theta", 1e6))
  mrope = tuple(rope.get("mrope_section") or (16, 24, 24))
  heads = t.get("num_attention_heads", 16)
  hidden = t.get("hidden_size", 2048)
  text_cfg = TextConfig(
      vocab_size=t.get("vocab_size", 151936),
      hidden_size=hidden,
      intermediate_size=t.get("intermediate_size", 11008),
      num_hidden_layers=t.get("num_hidden_layers", 36),
      num_attention_heads=heads,
      num_key_value_heads=t.get("num_key_value_heads", heads),
      head_dim=_pick(t, "head_dim", hidden // heads),
      rms_norm_eps=_pick(t, "rms_norm_eps", 1e-6),
      rope_theta=float(rope_theta),
      mrope_section=mrope,
      max_position_embeddings=t.get("max_position_embeddings", 128000),
      hidden_act=t.get("hidden_act", "silu"),
  )
  if sum(mrope) * 2 != text_cfg.head_dim:
    raise ValueError(f"config.json: mrope_section {list(mrope)} must sum to head_dim/2 = {text_cfg.head_dim // 2}")
  v = dict(cfg.get("vision_config") or {})
  vrope = v.get("rope_parameters") or {}
  vision_cfg = VisionConfig(
      depth=v.get("depth", 32),
      hidden_size=_pick(v, "hidden_size", _pick(v, "embed_dim", 1280)),
      intermediate_size=v.get("intermediate_size", 3420),
      num_heads=v.get("num_heads", 16),
      patch_size=_pick(v, "patch_size", _pick(v, "spatial_patch_size", 14)),
      temporal_patch_size=v.get("temporal_patch_size", 2),
      spatial_merge_size=v.get("spatial_merge_size", 2),
      in_channels=_pick(v, "in_channels", _pick(v, "in_chans", 3)),
      window_size=v.get("window_size", 112),
      out_hidden_size=_pick(v, "out_hidden_size", hidden),
      fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
      tokens_per_second=v.get("tokens_per_second", 4),
      hidden_act=v.get("hidden_act", "silu"),
      rope_theta=float(vrope.get("rope_theta", 10000.0)),
  )
  tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
  def tok(name, default):
    val = cfg.get(name, text.get(name, default))
    return default if val is None else val
  return ModelConfig(
      vision=vision_cfg,
      text=text_cfg,
      model_type=model_type,
      tie_word_embeddings=bool(tie),
      image_token_id=tok("image_token_id", 151655),
      video_token_id=tok("video_token_id", 151656),
      vision_start_token_id=tok("vision_start_token_id", 151652),
      vision_end_token_id=tok("vision_end_token_id", 151653),
      bos_token_id=cfg.get("bos_token_id", text.get("bos_token_id")),
      eos_token_id=cfg.get("eos_token_id", text.get("eos_token_id")),
      pad_token_id=cfg.get("pad_token_id", text.get("pad_token_id")),
      hf_dict=copy.deepcopy(cfg),
      **runtime,
  )


def to_hf_dict(config: ModelConfig) -> dict[str, Any]:
  """The ``config.json`` content (the loaded one if any, else a flat hub-style dict)."""
  if config.hf_dict is not None:
    return copy.deepcopy(config.hf_dict)
  t, v = config.text, config.vision
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "vocab_size": t.vocab_size,
      "hidden_size": t.hidden_size,
      "intermediate_size": t.intermediate_size,
      "num_hidden_layers": t.num_hidden_layers,
      "num_attention_heads": t.num_attention_heads,
      "num_key_value_heads": t.num_key_value_heads,
      "rms_norm_eps": t.rms_norm_eps,
      "rope_theta": t.rope_theta,
      "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
      "max_position_embeddings": t.max_position_embeddings,
      "hidden_act": t.hidden_act,
      "tie_word_embeddings": config.tie_word_embeddings,
      "use_sliding_window": False,
      "image_token_id": config.image_token_id,
      "video_token_id": config.video_token_id,
      "vision_start_token_id": config.vision_start_token_id,
      "vision_end_token_id": config.vision_end_token_id,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "pad_token_id": config.pad_token_id,
      "torch_dtype": "bfloat16" if config.param_dtype == "bfloat16" else "float32",
      "vision_config": {
          "model_type": "qwen2_5_vl",
          "depth": v.depth,
          "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size,
          "num_heads": v.num_heads,
          "patch_size": v.patch_size,
          "temporal_patch_size": v.temporal_patch_size,
          "spatial_merge_size": v.spatial_merge_size,
          "in_channels": v.in_channels,
          "window_size": v.window_size,
          "out_hidden_size": v.out_hidden_size,
          "fullatt_block_indexes": list(v.fullatt_block_indexes),
          "tokens_per_second": v.tokens_per_second,
          "hidden_act": v.hidden_act,
      },
  }


def load_config(path: str, **runtime) -> ModelConfig:
  with open(os.path.join(path, "config.json")) as f:
    return from_hf_dict(json.load(f), **runtime)
