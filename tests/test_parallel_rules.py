"""Mesh rules from a config: today's rules by default, overrides replace or add entries."""

import pytest

from papo_jax.parallel import DEFAULT_RULES, batch_shards, make_mesh, make_rules


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
