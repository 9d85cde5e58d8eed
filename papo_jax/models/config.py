"""Model configs read from (and written back to) Hugging Face ``config.json`` files.

Qwen2.5-VL hub configs are "flat" (text fields at the root, ``rope_scaling`` with
``mrope_section``); transformers v5 writes them nested (``text_config``,
``rope_parameters``). Qwen3-VL (``model_type`` "qwen3_vl") is always nested. All are
accepted, missing fields take the family's transformers class defaults, and the
original dict is kept so that a loaded checkpoint is written back unchanged.
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
  # Qwen3-VL: learned position table (side**2 rows, 0: none) and DeepStack source blocks.
  num_position_embeddings: int = 0
  deepstack_visual_indexes: tuple[int, ...] = ()

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
  # Qwen2.5-VL: q/k/v biases, chunked MRoPE. Qwen3-VL: no biases, qk-norm, interleaved MRoPE.
  attention_bias: bool = True
  qk_norm: bool = False
  mrope_interleaved: bool = False


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
  # Under an FSDP mesh, the layout for few rows per chip: each decoder layer casts its weights to
  # the compute dtype and gathers them where the layer runs (layers.gathered_at), instead of
  # leaving the gathers to the partitioner, and the log-prob head is split over the vocabulary
  # (rl.train_step.chunked_token_logprobs). 3B on v5e-8 at one row per chip: 27.8 -> 14.7 GiB;
  # at 10 rows per chip (3B on v5p-8) it costs memory: 47.8 -> 72.8 GiB (docs/tpu.md).
  gather_weights: bool = False
  # Vision full-attention layers attend per image, each padded to this many patches
  # (memory linear in images); 0: one segment-masked sequence over all patches.
  max_image_patches: int = 0
  hf_dict: Any = dataclasses.field(default=None, compare=False, repr=False)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def _pick(d: dict, key: str, default):
  v = d.get(key, default)
  return default if v is None else v


# Values used when config.json omits a field: Qwen2.5-VL-3B's for qwen2_5_vl (its hub
# vision_config leaves most fields to the class defaults), transformers' class defaults for
# qwen3_vl (Qwen3VLTextConfig / Qwen3VLVisionConfig).
_TEXT_DEFAULTS = {
    "qwen2_5_vl": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, head_dim=None, rope_theta=1e6, mrope_section=(16, 24, 24),
                       max_position_embeddings=128000, attention_bias=True),
    "qwen3_vl": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                     num_attention_heads=32, head_dim=128, rope_theta=5e5, mrope_section=(24, 20, 20),
                     max_position_embeddings=128000, attention_bias=False),
}
_VISION_DEFAULTS = {
    "qwen2_5_vl": dict(depth=32, hidden_size=1280, intermediate_size=3420, patch_size=14, hidden_act="silu",
                       out_hidden_size=None, num_position_embeddings=0, deepstack_visual_indexes=()),
    "qwen3_vl": dict(depth=27, hidden_size=1152, intermediate_size=4304, patch_size=16,
                     hidden_act="gelu_pytorch_tanh", out_hidden_size=3584, num_position_embeddings=2304,
                     deepstack_visual_indexes=(8, 16, 24)),
}


def from_hf_dict(cfg: dict[str, Any], **runtime) -> ModelConfig:
  """Builds a ModelConfig from a parsed ``config.json`` (flat or nested layout)."""
  model_type = cfg.get("model_type", "qwen2_5_vl")
  if model_type not in _TEXT_DEFAULTS:
    raise ValueError(f"config.json: model_type {model_type!r} is not supported (expected one of "
                     f"{sorted(_TEXT_DEFAULTS)})")
  qwen3 = model_type == "qwen3_vl"
  td, vd = _TEXT_DEFAULTS[model_type], _VISION_DEFAULTS[model_type]
  text = dict(cfg.get("text_config") or {})
  # Flat layout: text fields at the root; nested values take precedence.
  root_text = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
  t = {**root_text, **text}
  rope = t.get("rope_parameters") or t.get("rope_scaling") or cfg.get("rope_scaling") or {}
  rope_theta = _pick(rope, "rope_theta", _pick(t, "rope_theta", td["rope_theta"]))
  mrope = tuple(rope.get("mrope_section") or td["mrope_section"])
  heads = t.get("num_attention_heads", td["num_attention_heads"])
  hidden = t.get("hidden_size", td["hidden_size"])
  text_cfg = TextConfig(
      vocab_size=t.get("vocab_size", td["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=t.get("intermediate_size", td["intermediate_size"]),
      num_hidden_layers=t.get("num_hidden_layers", td["num_hidden_layers"]),
      num_attention_heads=heads,
      num_key_value_heads=_pick(t, "num_key_value_heads", heads),
      head_dim=_pick(t, "head_dim", td["head_dim"] or hidden // heads),
      rms_norm_eps=_pick(t, "rms_norm_eps", 1e-6),
      rope_theta=float(rope_theta),
      mrope_section=mrope,
      max_position_embeddings=t.get("max_position_embeddings", td["max_position_embeddings"]),
      hidden_act=t.get("hidden_act", "silu"),
      # Qwen2.5-VL always has q/k/v biases; Qwen3-VL reads attention_bias. transformers always
      # interleaves (and qk-norms) in Qwen3-VL; its `mrope_interleaved` flag is not read.
      attention_bias=bool(_pick(t, "attention_bias", td["attention_bias"])) if qwen3 else True,
      qk_norm=qwen3,
      mrope_interleaved=qwen3,
  )
  if sum(mrope) * 2 != text_cfg.head_dim:
    raise ValueError(f"config.json: mrope_section {list(mrope)} must sum to head_dim/2 = {text_cfg.head_dim // 2}")
  v = dict(cfg.get("vision_config") or {})
  vrope = v.get("rope_parameters") or {}
  vision_cfg = VisionConfig(
      depth=v.get("depth", vd["depth"]),
      hidden_size=_pick(v, "hidden_size", _pick(v, "embed_dim", vd["hidden_size"])),
      intermediate_size=v.get("intermediate_size", vd["intermediate_size"]),
      num_heads=v.get("num_heads", 16),
      patch_size=_pick(v, "patch_size", _pick(v, "spatial_patch_size", vd["patch_size"])),
      temporal_patch_size=v.get("temporal_patch_size", 2),
      spatial_merge_size=v.get("spatial_merge_size", 2),
      in_channels=_pick(v, "in_channels", _pick(v, "in_chans", 3)),
      window_size=v.get("window_size", 112),
      out_hidden_size=_pick(v, "out_hidden_size", vd["out_hidden_size"] or hidden),
      fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
      tokens_per_second=v.get("tokens_per_second", 4),
      hidden_act=v.get("hidden_act", vd["hidden_act"]),
      rope_theta=float(vrope.get("rope_theta", 10000.0)),
      num_position_embeddings=_pick(v, "num_position_embeddings", vd["num_position_embeddings"]),
      deepstack_visual_indexes=tuple(_pick(v, "deepstack_visual_indexes", vd["deepstack_visual_indexes"])),
  )
  if qwen3:
    side = int(round(vision_cfg.num_position_embeddings ** 0.5))
    if side < 1 or side * side != vision_cfg.num_position_embeddings:
      raise ValueError(f"config.json: vision_config.num_position_embeddings "
                       f"{vision_cfg.num_position_embeddings} is not a square (the table is side x side)")
    bad = [i for i in vision_cfg.deepstack_visual_indexes if not 0 <= i < vision_cfg.depth]
    if bad or len(vision_cfg.deepstack_visual_indexes) > text_cfg.num_hidden_layers:
      raise ValueError(f"config.json: deepstack_visual_indexes {list(vision_cfg.deepstack_visual_indexes)} need "
                       f"blocks in [0, {vision_cfg.depth}) and at most {text_cfg.num_hidden_layers} entries "
                       f"(one per decoder layer they feed)")
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
  """The ``config.json`` content (the loaded one if any, else a hub-style dict: flat for
  Qwen2.5-VL, nested for Qwen3-VL)."""
  if config.hf_dict is not None:
    return copy.deepcopy(config.hf_dict)
  if config.model_type == "qwen3_vl":
    return _qwen3_vl_hf_dict(config)
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


def _qwen3_vl_hf_dict(config: ModelConfig) -> dict[str, Any]:
  """Qwen3-VL's nested hub layout (rope_scaling + rope_theta in text_config, read by transformers 4.57 and 5)."""
  t, v = config.text, config.vision
  dtype = "bfloat16" if config.param_dtype == "bfloat16" else "float32"
  return {
      "architectures": ["Qwen3VLForConditionalGeneration"],
      "model_type": "qwen3_vl",
      "image_token_id": config.image_token_id,
      "video_token_id": config.video_token_id,
      "vision_start_token_id": config.vision_start_token_id,
      "vision_end_token_id": config.vision_end_token_id,
      "tie_word_embeddings": config.tie_word_embeddings,
      "torch_dtype": dtype,
      "text_config": {
          "model_type": "qwen3_vl_text",
          "vocab_size": t.vocab_size,
          "hidden_size": t.hidden_size,
          "intermediate_size": t.intermediate_size,
          "num_hidden_layers": t.num_hidden_layers,
          "num_attention_heads": t.num_attention_heads,
          "num_key_value_heads": t.num_key_value_heads,
          "head_dim": t.head_dim,
          "rms_norm_eps": t.rms_norm_eps,
          "rope_theta": t.rope_theta,
          "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
          "max_position_embeddings": t.max_position_embeddings,
          "hidden_act": t.hidden_act,
          "attention_bias": t.attention_bias,
          "bos_token_id": config.bos_token_id,
          "eos_token_id": config.eos_token_id,
          "pad_token_id": config.pad_token_id,
          "tie_word_embeddings": config.tie_word_embeddings,
          "torch_dtype": dtype,
      },
      "vision_config": {
          "model_type": "qwen3_vl_vision",
          "depth": v.depth,
          "hidden_size": v.hidden_size,
          "hidden_act": v.hidden_act,
          "intermediate_size": v.intermediate_size,
          "num_heads": v.num_heads,
          "in_channels": v.in_channels,
          "patch_size": v.patch_size,
          "spatial_merge_size": v.spatial_merge_size,
          "temporal_patch_size": v.temporal_patch_size,
          "out_hidden_size": v.out_hidden_size,
          "num_position_embeddings": v.num_position_embeddings,
          "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
      },
  }


def load_config(path: str, **runtime) -> ModelConfig:
  with open(os.path.join(path, "config.json")) as f:
    return from_hf_dict(json.load(f), **runtime)
