"""Tests for papo_jax.rl.advantages: GRPO group normalisation and DAPO dynamic sampling."""

import numpy as np
import pytest

from papo_jax.rl import advantages as adv


def _ref(rewards, eps=1e-6):
  r = np.asarray(rewards, np.float64)
  if r.size == 1:
    return np.zeros(1)
  return (r - r.mean()) / (np.std(r, ddof=1) + eps)


def test_hand_made_groups_by_reshape():
  r_GxN = np.array([[1.0, 0.0, 0.0, 1.0, 0.0],    # mixed
                    [1.0, 1.0, 1.0, 1.0, 1.0],    # all correct: zero variance
                    [0.0, 0.0, 0.0, 0.0, 0.0],    # all wrong
                    [0.9, 0.1, 1.0, 0.0, 0.9]])
  a_GxN = adv.grpo_advantages_GxN(r_GxN)
  # Row 0 by hand: mean 0.4, unbiased std sqrt(0.3).
  np.testing.assert_allclose(a_GxN[0], (r_GxN[0] - 0.4) / (np.sqrt(0.3) + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(a_GxN[1], 0)
  np.testing.assert_array_equal(a_GxN[2], 0)
  np.testing.assert_allclose(a_GxN[3], _ref(r_GxN[3]), rtol=1e-6)
  assert a_GxN.dtype == np.float32 and np.isfinite(a_GxN).all()
  a_B = adv.group_advantages(r_GxN.reshape(-1), group_size=5)
  np.testing.assert_array_equal(a_B, a_GxN.reshape(-1))


def test_group_ids_any_order_and_singletons():
  rng = np.random.default_rng(0)
  ids = np.array([3, 7, 3, 9, 7, 3, 7, 11, 11, 11])  # group 9 has a single response
  r = rng.random(ids.size)
  r[ids == 11] = 0.5  # a zero-variance group
  a = adv.group_advantages(r, ids)
  for g in np.unique(ids):
    np.testing.assert_allclose(a[ids == g], _ref(r[ids == g]), rtol=1e-6, atol=1e-7)
  assert a[ids == 9][0] == 0.0 and np.all(a[ids == 11] == 0.0)
  assert np.isfinite(a).all()
  np.testing.assert_array_equal(adv.grpo_advantages_GxN(np.array([[1.0], [0.0]])), 0)
  # String ids work too.
  np.testing.assert_allclose(adv.group_advantages(r, ids.astype(str)), a)


def test_group_advantages_errors():
  with pytest.raises(ValueError, match='group_size=3'):
    adv.group_advantages(np.zeros(4), group_size=3)
  with pytest.raises(ValueError, match='shape'):
    adv.group_advantages(np.zeros(4), np.zeros(3))


def test_broadcast_to_tokens():
  a = np.array([1.5, -2.0], np.float32)
  m = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  np.testing.assert_array_equal(adv.broadcast_to_tokens(a, m), [[1.5, 1.5, 0], [-2.0, 0, 0]])


def test_keep_groups_strict_bounds():
  acc = np.array([[1, 1, 1, 1, 1],
                  [0, 0, 0, 0, 0],
                  [1, 0, 0, 0, 0],
                  [1, 1, 1, 1, 0]], np.float32)
  np.testing.assert_array_equal(adv.keep_groups(acc), [False, False, True, True])
  # Groups of size 1 are always 0 or 1: never kept.
  np.testing.assert_array_equal(adv.keep_groups(np.array([[0.0], [1.0]])), [False, False])
  # Strict at the thresholds.
  assert not adv.keep_groups(np.array([[0.01]]))[0]
  assert not adv.keep_groups(np.array([[0.99]]))[0]
  assert adv.keep_groups(np.array([[0.5]]))[0]


def _chunk(start, g, n=5):
  return {'group_id': np.arange(start, start + g), 'reward_GxN': np.zeros((g, n))}


def test_dynamic_sampler_reaches_target_and_truncates():
  s = adv.DynamicSampler(target_groups=5)
  s.add(_chunk(0, 4), np.array([True, False, True, False]))
  assert not s.done
  s.add(_chunk(4, 4), np.array([False, False, False, False]))  # nothing kept this round
  assert not s.done
  s.add(_chunk(8, 4), np.array([True, True, True, True]))
  assert s.done and s.rounds == 3
  out = s.result()
  np.testing.assert_array_equal(out['group_id'], [0, 2, 8, 9, 10])  # exactly 5
  assert out['reward_GxN'].shape == (5, 5)
  m = s.metrics()
  assert m['dapo/rounds'] == 3 and m['dapo/groups_seen'] == 12 and m['dapo/groups_kept'] == 6
  assert m['dapo/fallback'] == 0.0 and m['dapo/keep_frac'] == pytest.approx(0.5)
  with pytest.raises(RuntimeError, match='after done'):
    s.add(_chunk(12, 4), np.ones(4, bool))


def test_dynamic_sampler_max_rounds_tops_up_with_filtered_groups():
  """After max_rounds the kept groups come first, then filtered ones in arrival order: the
  update batch keeps its static size; only as many filtered groups as a top-up can need are held."""
  s = adv.DynamicSampler(target_groups=5, max_rounds=3)
  s.add(['a', 'b', 'c'], [False, True, False])
  s.add(['d', 'e', 'f'], [False, False, False])
  assert not s.done
  s.add(['g', 'h', 'i'], [True, False, False])
  assert s.done and s.fallback and s.padded_groups == 3
  assert s.result() == ['b', 'g', 'a', 'c', 'd']
  m = s.metrics()
  assert m['dapo/fallback'] == 1.0 and m['dapo/padded_groups'] == 3.0 and m['dapo/groups_kept'] == 2
  assert sum(len(d) for d in s._dropped) == 5                # not all 7 filtered groups


def test_dynamic_sampler_too_few_generated_returns_all():
  s = adv.DynamicSampler(target_groups=10, max_rounds=2)
  s.add(['a', 'b', 'c'], [False, True, False])
  s.add(['d', 'e', 'f'], [True, False, False])
  assert s.result() == ['b', 'd', 'a', 'c', 'e', 'f'] and s.padded_groups == 4


def test_dynamic_sampler_nothing_kept_fills_with_filtered_groups():
  s = adv.DynamicSampler(target_groups=2, max_rounds=2)
  with pytest.raises(RuntimeError, match='before any add'):
    s.result()
  s.add(_chunk(0, 3), np.zeros(3, bool))
  with pytest.raises(RuntimeError, match='before done'):
    s.result()
  s.add(_chunk(3, 3), np.zeros(3, bool))
  assert s.done
  np.testing.assert_array_equal(s.result()['group_id'], [0, 1])
  with pytest.raises(ValueError, match='keep mask shape'):
    adv.DynamicSampler(2).add(_chunk(0, 3), np.zeros(2, bool))
