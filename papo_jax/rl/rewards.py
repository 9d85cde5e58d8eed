"""Rewards: 0.9 * accuracy + 0.1 * format (papo.md section 5), graded in a process pool.

The format and answer-extraction helpers run in the calling process and are linear in
the response length (no backtracking regexes), so a megabyte response costs
milliseconds. Mathematical equivalence (mathruler / math-verify, both on sympy) runs in
worker processes with a hard per-answer time-out: a worker that overruns is killed, the
answer scores 0, and a fresh worker takes its place.

This module imports neither JAX nor anything else of papo_jax, so the workers start fast.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import multiprocessing
import multiprocessing.connection
import os
import re
import time
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from absl import logging
import numpy as np

FORMAT_WEIGHT = 0.1

# The reference patterns (papo.md section 5), kept for documentation and tests. The
# scorer below implements the same language without regex backtracking.
FORMAT_PATTERNS = {
    'think': re.compile(r'<think>.*</think>.*\\boxed\{.*\}.*', re.DOTALL),
    'thinking': re.compile(r'.*</think>.*\\boxed\{.*\}.*', re.DOTALL),
}

_TAG_CHARS = frozenset('<>/')
_BOXED = '\\boxed{'


# ----------------------------------------------------------------------------------
# Format and extraction (caller's process; linear time).
# ----------------------------------------------------------------------------------


def strip_tag_whitespace(text: str) -> str:
  """Drops whitespace runs next to '<', '>' or '/', like re.sub(r'\\s*([<>/])\\s*', r'\\1')."""
  # re.sub with leading `\s*` is quadratic on long whitespace runs; splitting is linear.
  parts = re.split(r'(\s+)', text)
  out = []
  for i, part in enumerate(parts):
    if i % 2 == 1:  # a whitespace run (odd indices of a split with one group)
      prev_part, next_part = parts[i - 1], parts[i + 1] if i + 1 < len(parts) else ''
      if (prev_part and prev_part[-1] in _TAG_CHARS) or (next_part and next_part[0] in _TAG_CHARS):
        continue
    out.append(part)
  return ''.join(out)


def format_score(text: str, mode: str = 'think') -> float:
  """1.0 iff `text` (tag whitespace already stripped) fully matches FORMAT_PATTERNS[mode]."""
  if mode == 'think':
    if not text.startswith('<think>'):
      return 0.0
    end_think = text.find('</think>', len('<think>'))
  elif mode == 'thinking':
    end_think = text.find('</think>')
  else:
    raise ValueError(f'format mode {mode!r}: expected one of {sorted(FORMAT_PATTERNS)}')
  if end_think < 0:
    return 0.0
  # Earliest matches are optimal: every later part of the pattern only needs "exists after".
  boxed = text.find(_BOXED, end_think + len('</think>'))
  if boxed < 0:
    return 0.0
  return 1.0 if text.find('}', boxed + len(_BOXED)) >= 0 else 0.0


def extract_boxed(text: str) -> str:
  """Content of the last `\\boxed{...}` with braces matched, stripped; 'None' if absent/unclosed."""
  start = text.rfind(_BOXED)
  if start < 0:
    return 'None'
  start += len(_BOXED)
  depth = 0
  for m in re.finditer(r'[{}]', text[start:]):
    depth += 1 if m.group() == '{' else -1
    if depth == -1:
      return text[start:start + m.start()].strip()
  return 'None'


def normalize_synthetic(answer: str) -> str:
  """Lower-cased answer with all whitespace removed (the 'synthetic' task's equality)."""
  return ''.join(answer.split()).lower()


# ----------------------------------------------------------------------------------
# Graders (run inside the worker processes).
# ----------------------------------------------------------------------------------


def grade_mathruler(given: str, truth: str) -> bool:
  """mathruler.grader.grade_answer: normalised string match, else sympy equality."""
  from mathruler.grader import grade_answer  # pylint: disable=g-import-not-at-top
  return bool(grade_answer(given, truth))


def grade_math_verify(given: str, truth: str, timeout_s: int = 5) -> bool:
  """math_verify.verify(parse(truth), parse(given)), both wrapped in \\boxed{}."""
  import math_verify  # pylint: disable=g-import-not-at-top
  gold = math_verify.parse(f'\\boxed{{{truth}}}', parsing_timeout=timeout_s)
  pred = math_verify.parse(f'\\boxed{{{given}}}', parsing_timeout=timeout_s)
  if not gold or not pred:
    return False
  return bool(math_verify.verify(gold, pred, timeout_seconds=timeout_s))


def grade_exact(given: str, truth: str) -> bool:
  """Case- and whitespace-insensitive string equality."""
  return normalize_synthetic(given) == normalize_synthetic(truth)


_GRADERS = {
    'mathruler': grade_mathruler,
    'math_verify': grade_math_verify,
    'exact': grade_exact,
}


def resolve_callable(path: str) -> Callable[..., Any]:
  """'package.module:attr' -> the attribute."""
  module_name, sep, attr = path.partition(':')
  if not sep or not module_name or not attr:
    raise ValueError(f'callable path {path!r}: expected "module:attribute"')
  module = importlib.import_module(module_name)
  try:
    return getattr(module, attr)
  except AttributeError as e:
    raise ValueError(f'callable path {path!r}: module {module_name} has no {attr!r}') from e


def _resolve_grader(grader: str) -> Callable[[str, str], bool]:
  """Grader name ('mathruler', 'math_verify', 'exact') or 'module:function' -> function."""
  if grader in _GRADERS:
    return _GRADERS[grader]
  if ':' in grader:
    return resolve_callable(grader)
  raise ValueError(f'grader {grader!r}: expected one of {sorted(_GRADERS)} or "module:function"')


def _worker_main(conn, grader: str, grader_kw: dict[str, Any], memory_limit_mb: int | None):
  """Worker loop: receive (idx, given, truth), send (idx, ok) until None arrives."""
  if memory_limit_mb:
    try:
      import resource  # pylint: disable=g-import-not-at-top
      limit = memory_limit_mb * 2**20
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
      pass
  fn = _resolve_grader(grader)
  if grader == 'mathruler':
    import mathruler.grader  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  elif grader == 'math_verify':
    import math_verify  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  conn.send(('ready', os.getpid()))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError, KeyboardInterrupt):
      return
    if msg is None:
      return
    idx, given, truth = msg
    try:
      ok = bool(fn(given, truth, **grader_kw))
    except BaseException:  # pylint: disable=broad-except
      ok = False  # a grader error (RecursionError, MemoryError, sympy bug) scores 0
    conn.send((idx, ok))


# ----------------------------------------------------------------------------------
# The pool.
# ----------------------------------------------------------------------------------


class _Worker:
  """One grader process and the parent's end of its pipe."""

  def __init__(self, ctx, grader: str, grader_kw: dict[str, Any], memory_limit_mb: int | None):
    self.conn, child_conn = ctx.Pipe()
    self.proc = ctx.Process(
        target=_worker_main, args=(child_conn, grader, grader_kw, memory_limit_mb),
        name='papo-reward-worker', daemon=True)
    self.proc.start()
    child_conn.close()
    self.started_at = time.monotonic()
    self.ready = False
    self.task: int | None = None
    self.deadline = float('inf')

  def kill(self):
    """Kills the process (SIGKILL: a hung sympy loop ignores everything else)."""
    if self.proc.is_alive():
      self.proc.kill()
    self.proc.join(timeout=5)
    self.conn.close()


class RewardPool:
  """Grades (given, truth) answer pairs in worker processes with a hard per-answer time-out.

  Reusable across steps; use as a context manager or call close(). A worker that runs
  past `timeout_s` on one answer is killed and replaced; that answer scores 0.
  """

  def __init__(self, grader: str = 'mathruler', *, num_workers: int | None = None,
               timeout_s: float = 5.0, mp_context: str = 'spawn',
               start_timeout_s: float = 120.0, memory_limit_mb: int | None = 4096,
               grader_kw: dict[str, Any] | None = None):
    _resolve_grader(grader)  # fail early on a bad name, in the caller's process
    if timeout_s <= 0:
      raise ValueError(f'RewardPool timeout_s={timeout_s}: must be > 0')
    self.grader = grader
    self.grader_kw = dict(grader_kw or {})
    self.num_workers = num_workers or max(1, min(8, (os.cpu_count() or 2) - 1))
    self.timeout_s = float(timeout_s)
    self.start_timeout_s = float(start_timeout_s)
    self.memory_limit_mb = memory_limit_mb
    self._ctx = multiprocessing.get_context(mp_context)
    self._workers: list[_Worker] = []
    self._closed = False
    self.num_timeouts = 0
    self.num_crashes = 0
    self.num_graded = 0

  # -- lifecycle --------------------------------------------------------------------

  def __enter__(self) -> 'RewardPool':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def close(self) -> None:
    """Stops all workers; the pool cannot be used afterwards."""
    if self._closed:
      return
    self._closed = True
    for w in self._workers:
      try:
        if w.proc.is_alive() and w.task is None and w.ready:
          w.conn.send(None)
          w.proc.join(timeout=1)
      except (OSError, ValueError):
        pass
      w.kill()
    self._workers = []

  def _spawn(self) -> _Worker:
    return _Worker(self._ctx, self.grader, self.grader_kw, self.memory_limit_mb)

  def _replace(self, w: _Worker) -> None:
    w.kill()
    self._workers[self._workers.index(w)] = self._spawn()

  # -- grading ----------------------------------------------------------------------

  def grade(self, givens: Sequence[str], truths: Sequence[str]) -> np.ndarray:
    """[B] float32 in {0, 1}: 1 where grader(givens[i], truths[i]) is true within timeout_s."""
    if self._closed:
      raise RuntimeError('RewardPool.grade called after close()')
    if len(givens) != len(truths):
      raise ValueError(f'RewardPool.grade: {len(givens)} answers but {len(truths)} ground truths')
    # Identical (given, truth) pairs are common within a group: grade each once.
    uniq: dict[tuple[str, str], int] = {}
    which = np.array([uniq.setdefault((g, t), len(uniq)) for g, t in zip(givens, truths)],
                     dtype=np.int64)
    pairs = list(uniq)
    scores = np.zeros(len(pairs), np.float32)
    if pairs:
      self._run(pairs, scores)
    self.num_graded += len(pairs)
    return scores[which] if len(which) else np.zeros(0, np.float32)

  def _run(self, pairs: list[tuple[str, str]], scores: np.ndarray) -> None:
    """Dispatches pairs to workers one at a time each; writes 0/1 into scores."""
    while len(self._workers) < self.num_workers:
      self._workers.append(self._spawn())
    todo = collections.deque(range(len(pairs)))
    failed_starts = 0
    while todo or any(w.task is not None for w in self._workers):
      # Hand out work to idle workers.
      for w in self._workers:
        if todo and w.ready and w.task is None:
          idx = todo.popleft()
          try:
            w.conn.send((idx,) + pairs[idx])
          except (OSError, ValueError):  # died while idle: the task never started
            todo.appendleft(idx)
            self.num_crashes += 1
            self._replace(w)
            break
          w.task, w.deadline = idx, time.monotonic() + self.timeout_s
      now = time.monotonic()
      next_event = min(
          [w.deadline for w in self._workers if w.task is not None]
          + [w.started_at + self.start_timeout_s for w in self._workers if not w.ready])
      conns = [w.conn for w in self._workers]
      for conn in multiprocessing.connection.wait(conns, timeout=max(0.0, next_event - now)):
        w = next(w for w in self._workers if w.conn is conn)
        try:
          msg = conn.recv()
        except (EOFError, OSError):  # the worker died (segfault, OOM kill, ...)
          if w.task is not None:
            scores[w.task] = 0.0
            logging.warning('reward worker %d died grading answer %d; scored 0',
                            w.proc.pid, w.task)
          elif not w.ready:
            failed_starts += 1
            if failed_starts >= 3:
              raise RuntimeError(
                  f'reward worker for grader {self.grader!r} failed to start 3 times '
                  f'(exit code {w.proc.exitcode})')
          self.num_crashes += 1
          self._replace(w)
          continue
        if msg[0] == 'ready':
          w.ready = True
        else:
          idx, ok = msg
          scores[idx] = float(ok)
          w.task, w.deadline = None, float('inf')
      now = time.monotonic()
      for w in list(self._workers):
        if w.task is not None and now > w.deadline:
          logging.warning('reward worker %d: answer %d ran past %.1fs (%d chars); scored 0, '
                          'replacing the worker', w.proc.pid, w.task, self.timeout_s,
                          len(pairs[w.task][0]))
          scores[w.task] = 0.0
          self.num_timeouts += 1
          self._replace(w)
        elif not w.ready and now > w.started_at + self.start_timeout_s:
          raise RuntimeError(f'reward worker for grader {self.grader!r} did not start within '
                             f'{self.start_timeout_s:.0f}s')


# ----------------------------------------------------------------------------------
# Reward functions.
# ----------------------------------------------------------------------------------


@runtime_checkable
class RewardFn(Protocol):
  """(responses [B], ground truths [B]) -> {'overall', 'format', 'accuracy'}: [B] float32."""

  def __call__(self, responses: list[str], answers: list[str]) -> dict[str, np.ndarray]:
    ...


def combine_scores(accuracy_B: np.ndarray, format_B: np.ndarray,
                   format_weight: float = FORMAT_WEIGHT) -> dict[str, np.ndarray]:
  """{'overall': (1-w)*accuracy + w*format, 'format', 'accuracy'}, each [B] float32."""
  accuracy_B = np.asarray(accuracy_B, np.float32)
  format_B = np.asarray(format_B, np.float32)
  overall_B = (1.0 - format_weight) * accuracy_B + format_weight * format_B
  return {'overall': overall_B.astype(np.float32), 'format': format_B, 'accuracy': accuracy_B}


def _check_lengths(responses: Sequence[str], answers: Sequence[str]) -> None:
  if len(responses) != len(answers):
    raise ValueError(f'reward: {len(responses)} responses but {len(answers)} answers')


@dataclasses.dataclass
class BoxedAnswerReward:
  """RewardFn: format (papo.md section 5) and accuracy of the last \\boxed{} via a grader.

  grader: 'mathruler' (the paper's), 'math_verify', 'exact' or 'module:function';
  graders other than 'exact' run in a RewardPool created on first use.
  """
  grader: str = 'mathruler'
  format_mode: str = 'think'
  format_weight: float = FORMAT_WEIGHT
  timeout_s: float = 5.0
  num_workers: int | None = None
  mp_context: str = 'spawn'
  pool: RewardPool | None = None

  def __post_init__(self):
    if self.format_mode not in FORMAT_PATTERNS:
      raise ValueError(f'format_mode {self.format_mode!r}: expected one of {sorted(FORMAT_PATTERNS)}')
    _resolve_grader(self.grader)

  def _get_pool(self) -> RewardPool:
    if self.pool is None:
      kw = {'timeout_s': max(1, int(self.timeout_s))} if self.grader == 'math_verify' else {}
      self.pool = RewardPool(self.grader, num_workers=self.num_workers, timeout_s=self.timeout_s,
                             mp_context=self.mp_context, grader_kw=kw)
    return self.pool

  def __call__(self, responses: list[str], answers: list[str]) -> dict[str, np.ndarray]:
    _check_lengths(responses, answers)
    # As in EasyR1's math reward: both scores read the tag-whitespace-stripped response.
    stripped = [strip_tag_whitespace(r) for r in responses]
    format_B = np.array([format_score(s, self.format_mode) for s in stripped], np.float32)
    given = [extract_boxed(s) for s in stripped]
    truths = [str(a) for a in answers]
    if self.grader == 'exact':
      accuracy_B = np.array([grade_exact(g, t) for g, t in zip(given, truths)], np.float32)
    else:
      accuracy_B = self._get_pool().grade(given, truths)
    return combine_scores(accuracy_B, format_B, self.format_weight)

  def close(self) -> None:
    """Stops the worker pool, if any."""
    if self.pool is not None:
      self.pool.close()
      self.pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_REGISTRY: dict[str, Callable[..., RewardFn]] = {
    'math': functools.partial(BoxedAnswerReward, grader='mathruler'),
    'math_verify': functools.partial(BoxedAnswerReward, grader='math_verify'),
    'synthetic': functools.partial(BoxedAnswerReward, grader='exact'),
}


def register_reward_fn(name: str, factory: Callable[..., RewardFn]) -> None:
  """Adds a named reward factory for get_reward_fn."""
  if name in _REGISTRY:
    raise ValueError(f'reward {name!r} is already registered')
  _REGISTRY[name] = factory


def get_reward_fn(name: str, **kw) -> RewardFn:
  """Registered reward name ('math', 'math_verify', 'synthetic') or 'module:attr' -> RewardFn.

  For 'module:attr', a class is instantiated with **kw; a function is returned as is
  (or as functools.partial(fn, **kw) when kw is given) and is called as
  fn(responses, answers, **kw).
  """
  if name in _REGISTRY:
    return _REGISTRY[name](**kw)
  if ':' in name:
    obj = resolve_callable(name)
    if isinstance(obj, type):
      return obj(**kw)
    if not callable(obj):
      raise ValueError(f'reward {name!r}: {type(obj).__name__} is not callable')
    return functools.partial(obj, **kw) if kw else obj
  raise ValueError(f'reward {name!r}: expected one of {sorted(_REGISTRY)} or "module:function"')


# ----------------------------------------------------------------------------------
# From a run config (shared by training and evaluation).
# ----------------------------------------------------------------------------------

FORMAT_MODES = ('auto', 'think', 'thinking')


def format_mode(mode: str, processor: Any = None) -> str:
  """``reward.format_mode`` with ``auto`` resolved from the chat template.

  ``thinking`` when the processor's template opens ``<think>`` itself (Qwen3-VL
  "Thinking"), else ``think``.
  """
  if mode not in FORMAT_MODES:
    raise ValueError(f'reward.format_mode {mode!r} is not one of {FORMAT_MODES}')
  if mode != 'auto':
    return mode
  resolved = 'thinking' if processor is not None and getattr(processor, 'thinking', False) else 'think'
  logging.info('reward format mode %r (from the chat template)', resolved)
  return resolved


def make_reward_fn(reward_cfg: Any, processor: Any = None) -> RewardFn:
  """The reward function a run config's ``reward`` group names.

  Built-in rewards grade the format in ``reward.format_mode`` (papo.md section 5); the
  graders in worker processes (all but ``synthetic``) get ``timeout_s`` and
  ``num_workers``. A ``module:attr`` reward is called with no extra arguments.
  """
  name = reward_cfg.name
  if ':' in name:
    return get_reward_fn(name)
  kw: dict[str, Any] = {'format_mode': format_mode(reward_cfg.format_mode, processor)}
  if name != 'synthetic':
    kw.update(timeout_s=reward_cfg.timeout_s, num_workers=reward_cfg.num_workers)
  return get_reward_fn(name, **kw)
