"""Qwen-VL models in Flax NNX with Hugging Face checkpoint I/O."""

from papo_jax.models.checkpoint import abstract_model, from_pretrained, init_model, save_pretrained
from papo_jax.models.config import ModelConfig, TextConfig, VisionConfig, from_hf_dict, load_config, to_hf_dict
from papo_jax.models.positions import check_image_tokens, get_rope_index
from papo_jax.models.qwen2_5_vl import KVCache, Qwen25VL
from papo_jax.models.qwen3_vl import DeepStackEmbeds, Qwen3VL
from papo_jax.models.vision import check_image_patches

__all__ = [
    "DeepStackEmbeds", "KVCache", "ModelConfig", "Qwen25VL", "Qwen3VL", "TextConfig", "VisionConfig",
    "abstract_model", "check_image_tokens", "check_image_patches", "from_hf_dict", "from_pretrained",
    "get_rope_index", "init_model", "load_config", "save_pretrained", "to_hf_dict",
]
