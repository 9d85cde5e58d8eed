"""The rollout generator a run config's ``rollout`` group names: ``static`` or ``continuous``."""

from __future__ import annotations

from absl import logging

from papo_jax.sampling.engine import ContinuousEngine, EngineConfig
from papo_jax.sampling.sampler import Sampler, SamplingConfig

ENGINES = ("static", "continuous")


def engine_config(rollout) -> EngineConfig:
  """The continuous engine's static shapes from ``rollout.{num_slots, page_size, kv_pages, prefill_chunk,
  prefill_lanes, min_decode_lanes}``: its KV memory is ``kv_pages`` pages, not prompts x (prompt +
  max_new_tokens)."""
  return EngineConfig(num_slots=rollout.num_slots, page_size=rollout.page_size, num_pages=rollout.kv_pages,
                      prefill_chunk=rollout.prefill_chunk, prefill_lanes=rollout.prefill_lanes,
                      min_decode_lanes=rollout.min_decode_lanes)


def make_sampler(graphdef, cfg: SamplingConfig, rollout, mesh=None, rules=None):
  """``Sampler`` (static batch, the reference path) or ``ContinuousEngine`` (slots over a paged cache).

  Both take the trainer's parameters as they are and return the same ``Rollout``. The
  continuous engine keeps its cache unsharded, so on a mesh of several devices the static
  sampler is used, with a warning.
  """
  if rollout.engine not in ENGINES:
    raise ValueError(f"config field rollout.engine: {rollout.engine!r} is not one of {ENGINES}")
  if rollout.engine == "continuous":
    if mesh is not None and mesh.devices.size > 1:
      logging.warning("rollout.engine=continuous runs on one device; using the static sampler on this %d-device mesh",
                      mesh.devices.size)
    else:
      return ContinuousEngine(graphdef, cfg, engine_config(rollout))
  return Sampler(graphdef, cfg, mesh=mesh, rules=rules)
