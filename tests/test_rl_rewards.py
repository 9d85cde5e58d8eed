"""Tests for papo_jax.rl.rewards: format rule, last-boxed extraction, graders, time-outs."""

import random
import re
import time

import numpy as np
import pytest

from papo_jax.rl import rewards

T = '<think>reasoning</think> '  # a well-formed prefix: format 1 when a \boxed{} follows

# (response, ground truth, expected accuracy, expected format) under the 'math' reward
# (mathruler.grader.grade_answer, as in the paper).
TABLE = [
    # integers
    (T + r'\boxed{42}', '42', 1, 1),
    (T + r'\boxed{ 42 }', '42', 1, 1),
    (T + r'\boxed{42.0}', '42', 1, 1),
    (T + r'\boxed{043}', '43', 1, 1),  # integer strings are normalised
    (T + r'\boxed{-7}', '-7', 1, 1),
    (T + r'\boxed{7}', '-7', 0, 1),
    (T + r'\boxed{1,000}', '1000', 1, 1),
    (T + r'\boxed{41}', '42', 0, 1),
    # decimals
    (T + r'\boxed{3.14}', '3.14', 1, 1),
    (T + r'\boxed{0.5}', '0.5', 1, 1),
    (T + r'\boxed{.5}', '0.5', 1, 1),
    (T + r'\boxed{3.1}', '3.14', 0, 1),
    # fractions
    (T + r'\boxed{\frac{1}{2}}', r'\frac{1}{2}', 1, 1),
    (T + r'\boxed{\dfrac{1}{2}}', r'\frac{1}{2}', 1, 1),
    (T + r'\boxed{\tfrac{3}{4}}', '3/4', 1, 1),
    (T + r'\boxed{1/2}', r'\frac{1}{2}', 1, 1),
    (T + r'\boxed{0.5}', r'\frac{1}{2}', 1, 1),
    (T + r'\boxed{\frac12}', r'\frac{1}{2}', 1, 1),
    (T + r'\boxed{\frac{2}{4}}', r'\frac{1}{2}', 0, 1),  # unreduced fractions are wrong
    (T + r'\boxed{\frac{1}{3}}', r'\frac{1}{2}', 0, 1),
    # percentages and units
    (T + r'\boxed{50\%}', '50', 1, 1),
    (T + r'\boxed{50}', r'50\%', 1, 1),
    (T + r'\boxed{30^\circ}', '30', 1, 1),
    (T + r'\boxed{30 degrees}', '30', 1, 1),
    (T + r'\boxed{5 cm}', '5', 1, 1),
    (T + r'\boxed{\text{5 cm}}', '5', 1, 1),
    (T + r'\boxed{\$12}', '12', 1, 1),
    # multiple-choice letters and text
    (T + r'\boxed{A}', 'A', 1, 1),
    (T + r'\boxed{a}', 'A', 1, 1),
    (T + r'\boxed{B}', 'A', 0, 1),
    (T + r'\boxed{\text{C}}', 'C', 1, 1),
    (T + r'\boxed{Yes}', 'yes', 1, 1),
    # intervals and tuples
    (T + r'\boxed{(1, 2)}', '(1,2)', 1, 1),
    (T + r'\boxed{[1, 2)}', '(1,2)', 0, 1),
    (T + r'\boxed{(2, 1)}', '(1,2)', 0, 1),
    (T + r'\boxed{(-\infty, 3]}', r'(-\infty,3]', 1, 1),
    # expressions
    (T + r'\boxed{2\sqrt{3}}', r'\sqrt{12}', 1, 1),
    (T + r'\boxed{x^2+2x+1}', '(x+1)^2', 1, 1),
    (T + r'\boxed{\pi}', r'\pi', 1, 1),
    (T + r'\boxed{2\pi}', r'\pi', 0, 1),
    (T + r'\boxed{\sqrt{2}/2}', r'\frac{\sqrt{2}}{2}', 1, 1),
    (T + r'\boxed{x = 5}', '5', 1, 1),  # mathd normalisation drops "x ="
    # the last \boxed{} counts; nested braces are matched
    (T + r'first \boxed{1} then \boxed{2}', '2', 1, 1),
    (T + r'first \boxed{2} then \boxed{1}', '2', 0, 1),
    (T + r'\boxed{\frac{\sqrt{3}}{2}}', r'\frac{\sqrt{3}}{2}', 1, 1),
    (T + r'\boxed{{{7}}}', '7', 1, 1),
    (T + r'\boxed{\left\{1,2\right\}} text after', r'\{1,2\}', 1, 1),
    # missing or broken \boxed{}
    (T + 'the answer is 42', '42', 0, 0),
    (T + r'\boxed{42', '42', 0, 0),
    ('42', '42', 0, 0),
    ('', '42', 0, 0),
    # format rule
    (r'<think>r</think>\boxed{42}', '42', 1, 1),
    ('< think >r</ think >\n\\boxed{42}', '42', 1, 1),  # whitespace around < > / removed
    ('<think>\nmulti\nline\n</think>\n\n\\boxed{42}\n', '42', 1, 1),
    (r'prefix <think>r</think>\boxed{42}', '42', 1, 0),  # must start with <think>
    (r'<think>r\boxed{42}', '42', 1, 0),
    (r'r</think>\boxed{42}', '42', 1, 0),
    (r'<think>r</think>no box', '42', 0, 0),
    (r'\boxed{42}<think>r</think>', '42', 1, 0),  # \boxed must come after </think>
    (r'<think></think>\boxed{}', '42', 0, 1),
]


@pytest.fixture(scope='module')
def math_reward():
  with rewards.get_reward_fn('math', timeout_s=5.0, num_workers=2) as fn:
    yield fn


def test_reward_table_size_and_kinds():
  assert len(TABLE) >= 50


def test_math_reward_table(math_reward):
  responses = [r for r, _, _, _ in TABLE]
  answers = [a for _, a, _, _ in TABLE]
  out = math_reward(responses, answers)
  assert set(out) == {'overall', 'format', 'accuracy'}
  for i, (resp, ans, acc, fmt) in enumerate(TABLE):
    assert (out['accuracy'][i], out['format'][i]) == (acc, fmt), (i, resp, ans)
  np.testing.assert_allclose(out['overall'], 0.9 * out['accuracy'] + 0.1 * out['format'])
  for v in out.values():
    assert v.dtype == np.float32 and v.shape == (len(TABLE),)


# ----------------------------------------------------------------------------------
# Format rule and extraction against the reference regexes / mathruler's extractor.
# ----------------------------------------------------------------------------------


def _random_texts(n, seed=0):
  rng = random.Random(seed)
  atoms = ['<think>', '</think>', '<', '>', '/', ' ', '\n', '\t', 'a', '\\boxed{', '{', '}',
           'think', '\\boxed', '1', '< /think >', '</ think>', '  ']
  return [''.join(rng.choice(atoms) for _ in range(rng.randint(0, 12))) for _ in range(n)]


def test_strip_tag_whitespace_matches_regex():
  for text in _random_texts(3000):
    assert rewards.strip_tag_whitespace(text) == re.sub(r'\s*(<|>|/)\s*', r'\1', text), text


@pytest.mark.parametrize('mode', ['think', 'thinking'])
def test_format_score_matches_regex(mode):
  pattern = rewards.FORMAT_PATTERNS[mode]
  for text in _random_texts(3000, seed=1) + [r[0] for r in TABLE]:
    text = rewards.strip_tag_whitespace(text)
    assert rewards.format_score(text, mode) == float(bool(pattern.fullmatch(text))), text


def test_thinking_format():
  # Qwen3-VL Thinking models get '<think>' from the template: only '</think>' is emitted.
  assert rewards.format_score(r'reasoning</think>\boxed{1}', 'thinking') == 1.0
  assert rewards.format_score(r'reasoning</think>\boxed{1}', 'think') == 0.0
  assert rewards.format_score(r'reasoning\boxed{1}', 'thinking') == 0.0
  fn = rewards.get_reward_fn('synthetic', format_mode='thinking')
  out = fn([r'x</think>\boxed{Red}'], ['red'])
  assert out['format'][0] == 1.0 and out['accuracy'][0] == 1.0
  with pytest.raises(ValueError, match='format'):
    rewards.get_reward_fn('synthetic', format_mode='nope')


def test_extract_boxed_matches_mathruler():
  from mathruler.grader import extract_boxed_content
  for text in _random_texts(3000, seed=2) + [r[0] for r in TABLE]:
    assert rewards.extract_boxed(text) == extract_boxed_content(text), text
  assert rewards.extract_boxed(r'\boxed{a{b}c} and \boxed{\frac{1}{2}}') == r'\frac{1}{2}'
  assert rewards.extract_boxed('no box') == 'None'


def test_synthetic_reward():
  fn = rewards.get_reward_fn('synthetic')
  out = fn([T + r'\boxed{ Two Cats }', T + r'\boxed{2}', 'no box', r'\boxed{twocats}'],
           ['two cats', 'two', 'two', 'TwoCats'])
  np.testing.assert_array_equal(out['accuracy'], [1, 0, 0, 1])
  np.testing.assert_array_equal(out['format'], [1, 1, 0, 0])
  np.testing.assert_allclose(out['overall'], [1.0, 0.1, 0.0, 0.9])


def my_reward(responses, answers, bonus=0.0):
  n = len(responses)
  return {'overall': np.full(n, 0.5 + bonus, np.float32), 'format': np.zeros(n, np.float32),
          'accuracy': np.zeros(n, np.float32)}


def test_get_reward_fn_paths():
  fn = rewards.get_reward_fn(f'{__name__}:my_reward', bonus=0.25)
  assert fn(['a'], ['b'])['overall'][0] == 0.75
  cls_fn = rewards.get_reward_fn('papo_jax.rl.rewards:BoxedAnswerReward', grader='exact')
  assert cls_fn([T + r'\boxed{x}'], ['X'])['overall'][0] == pytest.approx(1.0)
  assert isinstance(cls_fn, rewards.RewardFn)
  with pytest.raises(ValueError, match='nope'):
    rewards.get_reward_fn('nope')
  with pytest.raises(ValueError, match='no_such'):
    rewards.get_reward_fn('papo_jax.rl.rewards:no_such')
  with pytest.raises(ValueError, match='2 responses but 1 answers'):
    rewards.get_reward_fn('synthetic')(['a', 'b'], ['a'])


def test_math_verify_reward():
  rows = [
      (T + r'\boxed{\frac{1}{2}}', '0.5', 1),
      (T + r'\boxed{42}', '42', 1),
      (T + r'\boxed{B}', 'A', 0),
      (T + r'\boxed{2\sqrt{3}}', r'\sqrt{12}', 1),
      (T + r'\boxed{(1, 2)}', '(1,2)', 1),
      (T + 'no box', '42', 0),
  ]
  with rewards.get_reward_fn('math_verify', timeout_s=5.0, num_workers=2) as fn:
    out = fn([r for r, _, _ in rows], [a for _, a, _ in rows])
  np.testing.assert_array_equal(out['accuracy'], [acc for _, _, acc in rows])


# ----------------------------------------------------------------------------------
# Hostile answers: bounded wall time, score 0, the pool survives.
# ----------------------------------------------------------------------------------

HOSTILE = [
    r'\boxed{(x+1)**100000}',          # sympy expands forever
    r'\boxed{2**2**40}',               # a 2^40-bit integer
    r'\boxed{10**10**10}',
    r'\boxed{9^9^9^9}',
    r'\boxed{9^{9^{9^9}}}',
    '\\boxed{' + '\\frac{1}{' * 3000 + '1' + '}' * 3000 + '}',  # deeply nested LaTeX
    '\\boxed{' + '1+' * 500_000 + '1}',  # a megabyte answer
]


def test_fast_paths_on_huge_strings_give_the_regex_answers():
  """Megabyte responses that make backtracking regexes explode are scored right, in bounded CPU time.

  The bound is this process's CPU time (not wall time, so a loaded machine does not
  matter) with a wide margin: the linear scorer needs well under a second here, a
  backtracking one hours.
  """
  big = 1_000_000
  cases = [  # (text, stripped length, format think, format thinking, boxed content)
      (' ' * 2_000_000, 2_000_000, 0.0, 0.0, 'None'),
      ('<' * 2_000_000, 2_000_000, 0.0, 0.0, 'None'),
      ('</think>' * 200_000, 1_600_000, 0.0, 0.0, 'None'),
      ('{' * 2_000_000, 2_000_000, 0.0, 0.0, 'None'),
      ('<think>' + '\\boxed{' * 200_000, 7 + 1_400_000, 0.0, 0.0, 'None'),
      ('<think>' + ' ' * big + '</think>' + 'x' * big + '\\boxed{' + '{' * 10 + '3' + '}' * 11,
       7 + 8 + big + 7 + 22, 1.0, 1.0, '{' * 10 + '3' + '}' * 10),
  ]
  start = time.process_time()
  for text, length, think, thinking, boxed in cases:
    s = rewards.strip_tag_whitespace(text)
    assert (len(s), rewards.format_score(s), rewards.format_score(s, 'thinking'), rewards.extract_boxed(s)) == (
        length, think, thinking, boxed)
  assert time.process_time() - start < 60.0
  # The same answers as the reference regexes where those still finish (short inputs).
  for text, *_ in cases:
    short = text[:200] + text[-200:]
    s = rewards.strip_tag_whitespace(short)
    assert s == re.sub(r'\s*([<>/])\s*', r'\1', short)
    for mode in ('think', 'thinking'):
      assert rewards.format_score(s, mode) == float(bool(rewards.FORMAT_PATTERNS[mode].fullmatch(s)))


def test_hostile_answers_time_out_and_score_zero():
  timeout_s, workers = 1.0, 2
  with rewards.RewardPool('mathruler', num_workers=workers, timeout_s=timeout_s) as pool:
    pool.grade(['1'], ['1'])  # start the workers outside the timed region
    given = [rewards.extract_boxed(h) for h in HOSTILE]
    start = time.monotonic()
    scores = pool.grade(given, ['x+1'] * len(given))
    elapsed = time.monotonic() - start
    np.testing.assert_array_equal(scores, 0)
    # Each answer holds a worker at most timeout_s, plus the start of a replacement.
    rounds = -(-len(given) // workers)
    assert elapsed < rounds * (timeout_s + 6.0), elapsed
    assert pool.num_timeouts >= 1
    # The pool replaced its hung workers and still grades.
    np.testing.assert_array_equal(pool.grade(['1/2', '3', '4'], ['0.5', '3', '5']), [1, 1, 0])
  with pytest.raises(RuntimeError, match='after close'):
    pool.grade(['1'], ['1'])


def test_reward_fn_with_hostile_response_in_batch(math_reward):
  start = time.monotonic()
  out = math_reward([T + HOSTILE[0], T + r'\boxed{3}'], ['x+1', '3'])
  assert time.monotonic() - start < math_reward.timeout_s + 10.0
  np.testing.assert_array_equal(out['accuracy'], [0, 1])
  np.testing.assert_array_equal(out['format'], [1, 1])
