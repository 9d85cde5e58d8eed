"""A run's workdir on a local disk, ``gs://`` or any fsspec URL.

A preempted VM takes its local disk with it, so the run's records (``metrics.jsonl``,
``samples.jsonl``, ``config.json``, ``tb/``) can live in a bucket next to the
checkpoints (orbax writes ``gs://`` itself). Object stores have no append, so a
:class:`JsonlLog` on a URL keeps the whole file in memory and rewrites it on each flush
(a long run's metrics are a few MB). TensorBoard event files are written to a local
directory and copied to the URL by :class:`DirMirror` (tensorboardX writes ``gs://`` only
with google-cloud-storage installed and knows no other fsspec scheme).
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time

from absl import logging


def is_url(path: str) -> bool:
  return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str) -> str:
  return path[len("file://"):] if str(path).startswith("file://") else str(path)


def join(base: str, *parts: str) -> str:
  """``os.path.join`` for local paths, ``/``-joined for URLs."""
  return posixpath.join(base, *parts) if is_url(base) else os.path.join(_local(base), *parts)


def filesystem(path: str):
  """(fsspec filesystem, path inside it)."""
  import fsspec
  return fsspec.core.url_to_fs(path)


def makedirs(path: str) -> None:
  if not is_url(path):
    os.makedirs(_local(path), exist_ok=True)
    return
  fs, p = filesystem(path)
  fs.makedirs(p, exist_ok=True)


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(_local(path))
  fs, p = filesystem(path)
  return fs.exists(p)


def open_file(path: str, mode: str = "r"):
  """A file object for ``path`` (``open`` for local paths, ``fsspec.open`` for URLs)."""
  if not is_url(path):
    return open(_local(path), mode)
  import fsspec
  return fsspec.open(path, mode).open()


def read_text(path: str) -> str:
  with open_file(path, "r") as f:
    return f.read()


def _write_whole(path: str, data, mode: str) -> None:
  """Writes ``data`` whole (local: parents created, through a temporary file, so a kill never
  leaves half a file)."""
  if is_url(path):
    with open_file(path, mode) as f:
      f.write(data)
    return
  path = _local(path)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_")
  with os.fdopen(fd, mode) as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` whole (see :func:`_write_whole`)."""
  _write_whole(path, text, "w")


def write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` whole (a PNG, ...; see :func:`_write_whole`)."""
  _write_whole(path, data, "wb")


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON-lines file (none when it does not exist)."""
  if not exists(path):
    return []
  return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def local_root(workdir: str, c) -> str:
  """Where a run keeps files that must be local (the tiny model): the workdir itself, or for
  a URL workdir a per-host cache keyed by the URL and everything the tiny model depends on."""
  if not is_url(workdir):
    return workdir
  return cache_dir(workdir, c.model.tiny.to_dict(), c.data.min_pixels, c.data.max_pixels)


def cache_dir(url: str, *key) -> str:
  """A local directory for files that must be local (a tiny model's checkpoint) of a URL workdir.

  ``$PAPO_JAX_CACHE`` (default ``~/.cache/papo_jax``) ``/workdirs/<hash of url and key>``:
  the same URL and key find the same directory on a rerun or resume on this host.
  """
  import hashlib
  root = cache_root()
  digest = hashlib.sha256(json.dumps([str(url), *key], sort_keys=True, default=str).encode()).hexdigest()[:16]
  path = os.path.join(root, "workdirs", digest)
  os.makedirs(path, exist_ok=True)
  return path


def cache_root() -> str:
  """``$PAPO_JAX_CACHE``, default ``~/.cache/papo_jax``: this host's files kept between runs."""
  return os.environ.get("PAPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "papo_jax")


def use_compilation_cache(setting: str) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory (None: off).

  ``setting`` (``train.compilation_cache``): ``"auto"`` = ``$JAX_COMPILATION_CACHE_DIR`` when set,
  else ``<cache_root()>/xla``; ``""`` = off; anything else is the directory (``gs://`` works, shared
  by a pod's hosts). A resumed or repeated run then loads its programs instead of compiling them
  again, which on a pod saves minutes per restart.
  """
  import jax
  if not setting:
    return None
  path = (os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_root(), "xla")) \
      if setting == "auto" else setting
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def _step_of(line: str, path: str, lineno: int) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    logging.warning("%s line %d: no step (a line cut by a kill?); dropped", path, lineno)
    return None


def truncate_to_step(path: str, last_step: int) -> int:
  """Drops the rows of a JSON-lines log whose ``step`` is above ``last_step``; returns rows dropped.

  After a resume from the checkpoint of step S, the rows a killed run wrote for steps after
  S are recomputed, so they go (as does a half-written last line); a missing file is fine.
  """
  if not exists(path):
    return 0
  lines = read_text(path).splitlines()
  keep = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    s = _step_of(line, path, i + 1)
    if s is not None and s <= last_step:
      keep.append(line)
  dropped = len(lines) - len(keep)
  if dropped:
    logging.info("%s: dropped %d rows after step %d (recomputed after the resume)", path, dropped, last_step)
    write_text(path, "".join(l + "\n" for l in keep))
  return dropped


class JsonlLog:
  """Appends JSON rows to ``path``; ``resume_step`` first drops rows written after that step.

  Local files are appended and flushed per row. On a URL the rows are kept in memory and
  the whole file is rewritten at most every ``flush_every_s`` seconds, on :meth:`flush`
  and on :meth:`close` (so a preemption that ends the process cleanly loses nothing).
  """

  def __init__(self, path: str, *, resume_step: int | None = None, flush_every_s: float = 30.0):
    self.path = path
    self.remote = is_url(path)
    self.flush_every_s = flush_every_s
    parent = posixpath.dirname(path) if self.remote else os.path.dirname(os.path.abspath(_local(path)))
    makedirs(parent)
    if resume_step is not None:
      truncate_to_step(path, resume_step)
    if self.remote:
      self._lines = read_text(path).splitlines(keepends=True) if exists(path) else []
      self._dirty = False
      self._last_flush = time.monotonic()
      self._file = None
    else:
      self._file = open(_local(path), "a")

  def write(self, row: dict) -> None:
    line = json.dumps(row) + "\n"
    if not self.remote:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    self._dirty = True
    if time.monotonic() - self._last_flush >= self.flush_every_s:
      self.flush()

  def flush(self) -> None:
    if not self.remote:
      self._file.flush()
      return
    if self._dirty:
      write_text(self.path, "".join(self._lines))
      self._dirty = False
    self._last_flush = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


class DirMirror:
  """A local directory copied to a URL: files new or changed (size or mtime) since the last sync.

  For writers that need a local path (TensorBoard). On a local ``url`` it is that directory
  and :meth:`sync` does nothing.
  """

  def __init__(self, url: str, local_dir: str | None = None):
    self.url = url
    if is_url(url):
      self.local_dir = local_dir or tempfile.mkdtemp(prefix="papo_mirror_")
    else:
      self.local_dir = _local(url)
    os.makedirs(self.local_dir, exist_ok=True)
    self._seen: dict[str, tuple[int, int]] = {}

  def sync(self) -> int:
    """Copies what changed; returns the number of files copied."""
    if not is_url(self.url):
      return 0
    fs, root = filesystem(self.url)
    n = 0
    for d, _, files in os.walk(self.local_dir):
      for name in files:
        src = os.path.join(d, name)
        st = os.stat(src)
        sig = (st.st_size, st.st_mtime_ns)
        rel = os.path.relpath(src, self.local_dir)
        if self._seen.get(rel) == sig:
          continue
        dest = posixpath.join(root, *rel.split(os.sep))
        fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        fs.put_file(src, dest)
        self._seen[rel] = sig
        n += 1
    return n


DONE_FILE = "DONE"


def mark_done(workdir: str, step: int) -> str:
  """Writes ``<workdir>/DONE`` (the final step, JSON) once a run has completed all its steps.

  ``launch/tpu.sh supervise`` stops recreating the slice once this file exists.
  """
  path = join(workdir, DONE_FILE)
  write_text(path, json.dumps({"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
  return path


def is_done(workdir: str) -> bool:
  return exists(join(workdir, DONE_FILE))
