"""Safetensors in and out, in the official Hugging Face key layout.

``config.json``'s ``model_type`` picks the model class (``qwen2_5_vl`` -> Qwen25VL,
``qwen3_vl`` -> Qwen3VL). Reading accepts the Qwen2.5-VL hub layout (``visual.*``,
``model.layers.*``, ``lm_head``) and transformers v5's (``model.visual.*``,
``model.language_model.*``, the layout of the Qwen3-VL hub checkpoints), single files
or sharded with ``model.safetensors.index.json``. Tensors are memory-mapped and
converted one at a time straight into the requested dtype and sharding, so a 7B
loads without two full copies in host memory. Writing uses each family's official
layout (the first for Qwen2.5-VL, the second for Qwen3-VL), which every transformers
version loads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from papo_jax.models.config import ModelConfig, load_config, to_hf_dict
from papo_jax.models.qwen2_5_vl import Qwen25VL
from papo_jax.models.qwen3_vl import Qwen3VL
from papo_jax.parallel import DEFAULT_RULES, state_shardings

_RENAMES = ((re.compile(r"^model\.visual\."), "visual."), (re.compile(r"^model\.language_model\."), "model."))
MODEL_CLASSES = {"qwen2_5_vl": Qwen25VL, "qwen3_vl": Qwen3VL}


def canonical_key(hf_key: str) -> str:
  """Maps any supported checkpoint key to the official layout."""
  for pattern, repl in _RENAMES:
    if pattern.match(hf_key):
      return pattern.sub(repl, hf_key)
  return hf_key


def model_class(config: ModelConfig) -> type[Qwen25VL]:
  if config.model_type not in MODEL_CLASSES:
    raise ValueError(f"model_type {config.model_type!r} has no model class (known: {sorted(MODEL_CLASSES)})")
  return MODEL_CLASSES[config.model_type]


def saved_key(key: str, model_type: str) -> str:
  """Official (Qwen2.5-VL hub) key -> the key written for ``model_type`` (Qwen3-VL: the v5 layout)."""
  if model_type != "qwen3_vl":
    return key
  if key.startswith("visual."):
    return "model." + key
  if key.startswith("model."):
    return "model.language_model." + key[len("model."):]
  return key


def _path_to_key(path: tuple[Any, ...]) -> tuple[str, str]:
  """Our parameter path -> (official key, kind). kind says how to transform the tensor."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  mod = ".".join(parts[:-1]).replace("mlp_0", "mlp.0").replace("mlp_2", "mlp.2")
  if leaf == "kernel":
    kind = "patch_embed" if mod == "visual.patch_embed.proj" else "linear"
    return f"{mod}.weight", kind
  if leaf == "embedding":
    return f"{mod}.weight", "copy"
  return f"{mod}.{leaf}", "copy"


def _to_ours(t: np.ndarray, kind: str, shape) -> np.ndarray:
  if kind == "linear":
    t = t.T
  elif kind == "patch_embed":
    t = t.reshape(t.shape[0], -1).T
  if tuple(t.shape) != tuple(shape):
    raise ValueError(f"checkpoint tensor has shape {t.shape} after conversion, model expects {tuple(shape)}")
  return t


def _to_hf(t: np.ndarray, kind: str, cfg: ModelConfig) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(t.T)
  if kind == "patch_embed":
    v = cfg.vision
    return np.ascontiguousarray(t.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
  return np.ascontiguousarray(t)


def _safetensor_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, fn) for fn in files]
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors file")
  return [os.path.join(path, fn) for fn in found]


class _TensorIndex:
  """Lazily opened safetensors files, addressed by official keys."""

  def __init__(self, path: str):
    self.where: dict[str, tuple[str, str]] = {}
    for fn in _safetensor_files(path):
      with safe_open(fn, framework="numpy") as f:
        for k in f.keys():
          self.where[canonical_key(k)] = (fn, k)
    self._open: dict[str, Any] = {}

  def get(self, key: str) -> np.ndarray:
    fn, raw = self.where[key]
    if fn not in self._open:
      self._open[fn] = safe_open(fn, framework="numpy").__enter__()
    return self._open[fn].get_tensor(raw)

  def close(self):
    for f in self._open.values():
      f.__exit__(None, None, None)
    self._open.clear()


def init_model(config: ModelConfig, seed: int = 0) -> Qwen25VL:
  """A randomly initialised model of the config's family (tiny configs, benchmarks)."""
  return model_class(config)(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> Qwen25VL:
  cls = model_class(config)
  return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def from_pretrained(path: str, *, dtype: str = "bfloat16", param_dtype: str | None = None, mesh=None,
                    rules=DEFAULT_RULES, remat: bool = False, attention: str = "xla", attention_block: int = 512,
                    max_image_patches: int = 0, gather_weights: bool = False) -> Qwen25VL:
  """Loads ``config.json`` + safetensors from a local directory into an NNX model.

  With a mesh, every tensor goes straight to its sharding from the logical-axis rules.
  ``attention``/``attention_block``/``max_image_patches``/``gather_weights``: see :class:`ModelConfig`.
  """
  param_dtype = param_dtype or dtype
  config = load_config(path, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention,
                       attention_block=attention_block, max_image_patches=max_image_patches,
                       gather_weights=gather_weights)
  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, rules) if mesh is not None else None
  tensors = _TensorIndex(path)
  used = set()
  flat = nnx.to_flat_state(state)
  flat_sh = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  loaded = []
  try:
    for p, var in flat:
      key, kind = _path_to_key(p)
      if key not in tensors.where:
        if key == "lm_head.weight" and "model.embed_tokens.weight" in tensors.where:
          key = "model.embed_tokens.weight"
        else:
          raise KeyError(f"{path}: checkpoint has no tensor {key!r} (needed for parameter {'.'.join(map(str, p))})")
      used.add(key)
      host = _to_ours(tensors.get(key), kind, var.get_value().shape).astype(jnp.dtype(param_dtype))
      sh = flat_sh.get(p)
      value = jax.device_put(host, sh.get_value() if isinstance(sh, nnx.Variable) else sh) if sh is not None else jnp.asarray(host)
      loaded.append((p, var.replace(value)))
  finally:
    tensors.close()
  unused = sorted(set(tensors.where) - used - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
  if unused:
    logging.warning("%s: %d checkpoint tensors were not used, e.g. %s", path, len(unused), unused[:5])
  state = nnx.from_flat_state(loaded)
  return nnx.merge(graphdef, state)


def iter_hf_tensors(model: Qwen25VL) -> Iterator[tuple[str, np.ndarray]]:
  """(checkpoint key in the family's official layout, numpy tensor) for every parameter, in HF's shapes."""
  _, state = nnx.split(model)
  for p, var in nnx.to_flat_state(state):
    key, kind = _path_to_key(p)
    t = _to_hf(np.asarray(jax.device_get(var.get_value())), kind, model.config)
    yield saved_key(key, model.config.model_type), t


def save_pretrained(model: Qwen25VL, path: str, *, max_shard_bytes: int = 5 * 2**30, dtype: str | None = None) -> None:
  """Writes config.json + safetensors (sharded with an index above ``max_shard_bytes``)."""
  os.makedirs(path, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key, t in iter_hf_tensors(model):
    if dtype is not None:
      t = t.astype(jnp.dtype(dtype))
    if size + t.nbytes > max_shard_bytes and shards[-1]:
      shards.append({})
      size = 0
    shards[-1][key] = t
    size += t.nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
  else:
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
      fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, fn), metadata=meta)
      for k, t in shard.items():
        weight_map[k] = fn
        total += t.nbytes
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  cfg = to_hf_dict(model.config)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
