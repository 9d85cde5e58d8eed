"""Mesh rules from a config: today's rules by default, overrides replace or add entries."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from papo_jax.parallel import (DEFAULT_RULES, batch_shards, constrain_gathered, constrain_split, make_mesh, make_rules,
                               use_mesh_rules)


def test_make_rules_defaults_and_overrides():
  assert make_rules() == DEFAULT_RULES
  rules = dict(make_rules([("patch", ["data", "fsdp"]), ("embed", None), ("experts", "tensor")]))
  assert rules["patch"] == ("data", "fsdp") and rules["embed"] is None and rules["experts"] == "tensor"
  assert rules["mlp"] == "tensor"
  with pytest.raises(ValueError, match="mesh.rules: 'embed' maps to 'model'"):
    make_rules([("embed", "model")])


def test_batch_shards():
  assert batch_shards(None) == 1
  assert batch_shards(make_mesh(data=2, fsdp=2, tensor=2)) == 4
  assert batch_shards(make_mesh(data=2, fsdp=2, tensor=2), make_rules([("batch", "data")])) == 2


def test_gathered_and_vocab_split_constraints():
  """A weight gathered over the FSDP axes keeps its tensor-parallel axis; a split puts one
  dimension over the batch axes; both are identities outside a mesh."""
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
  assert constrain_gathered(w, ("embed", "mlp")) is w and constrain_split(w, 0) is w

  def specs(x):
    with use_mesh_rules(mesh):
      return constrain_gathered(x, ("embed", "mlp")), constrain_split(x, 0)

  g, s = jax.jit(specs)(w)
  assert g.sharding.spec == P(None, "tensor")
  assert s.sharding.spec == P(("data", "fsdp"))
  assert (g == w).all() and (s == w).all()

