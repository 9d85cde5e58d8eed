"""Rollout plumbing shared by training and evaluation: decoding responses, the reward from a run config."""

import numpy as np
import pytest

from papo_jax.data.decode import decode_responses
from papo_jax.rl import rewards


class _Tok:
  def decode(self, ids, skip_special_tokens=False):
    assert skip_special_tokens is False
    return " ".join(str(i) for i in ids)


def test_decode_responses_keeps_masked_tokens_and_drops_stop_ids():
  toks = np.array([[5, 6, 2, 0], [7, 2, 9, 9]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  assert decode_responses(_Tok(), toks, mask, (2,)) == ["5 6", "7"]
  from papo_jax import data
  assert data.decode_responses is decode_responses


def test_make_reward_fn_resolves_format_mode_and_arguments(tmp_path):
  from papo_jax.config_base import base_config
  from papo_jax.data import processor as proc_lib
  from papo_jax.data import tiny_tokenizer
  c = base_config()
  c.reward.name = "synthetic"
  modes = {}
  for name, kw in (("qwen25", {}), ("instruct", dict(family="qwen3_vl")),
                   ("thinking", dict(family="qwen3_vl", thinking=True))):
    d = str(tmp_path / name)
    tiny_tokenizer.build_tiny_checkpoint_files(d, **kw)
    proc = proc_lib.Processor.from_pretrained(d)
    modes[name] = rewards.format_mode("auto", proc)
    assert rewards.make_reward_fn(c.reward, proc).format_mode == modes[name]
  assert modes == {"qwen25": "think", "instruct": "think", "thinking": "thinking"}
  assert rewards.format_mode("think", proc) == "think"
  with pytest.raises(ValueError, match="format_mode"):
    rewards.format_mode("xml")
  c.reward.name = f"{__name__}:plain_reward"   # a module:function reward gets no extra arguments
  fn = rewards.make_reward_fn(c.reward)
  assert fn(["a"], ["a"])["overall"].tolist() == [1.0]
  c.reward.name = "math"
  c.reward.timeout_s, c.reward.num_workers = 3.0, 1
  with rewards.make_reward_fn(c.reward) as fn:
    assert (fn.timeout_s, fn.num_workers, fn.format_mode) == (3.0, 1, "think")


def plain_reward(responses, answers):
  acc = np.asarray([r == a for r, a in zip(responses, answers)], np.float32)
  return {"overall": acc, "accuracy": acc, "format": acc}


def test_groups_from_batch_gives_each_prompt_its_images_and_responses():
  import types
  from papo_jax.rollouts import groups_from_batch, repeat_answers
  pv = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)          # 4 + 8 real patch rows, 4 padding rows
  batch = types.SimpleNamespace(
      input_ids=np.array([[0, 5, 6], [7, 8, 9]]), attention_mask=np.array([[0, 1, 1], [1, 1, 1]]),
      pixel_values=pv, masked_pixel_values=-pv, image_grid_thw=np.array([[1, 2, 2], [1, 2, 4]]),
      image_counts=np.array([1, 1]), num_images=2)
  toks = np.arange(2 * 3 * 4).reshape(6, 4)                          # n = 3 responses per prompt
  mask = np.ones_like(toks)
  g0, g1 = groups_from_batch(batch, toks, mask, 3)
  np.testing.assert_array_equal(g0.pixel_values, pv[:4])
  np.testing.assert_array_equal(g1.pixel_values, pv[4:12])
  np.testing.assert_array_equal(g1.masked_pixel_values, -pv[4:12])
  np.testing.assert_array_equal(g1.image_grid_thw, [[1, 2, 4]])
  np.testing.assert_array_equal(g1.responses, toks[3:])
  np.testing.assert_array_equal(g0.prompt_mask, [0, 1, 1])
  assert (g0.advantages == 0).all() and g0.advantages.shape == (3,)
  assert repeat_answers(["a", "b"], 2) == ["a", "a", "b", "b"]
