"""Remote paths (``gs://``, ``s3://``, any fsspec URL) for checkpoints and datasets.

The model loader memory-maps safetensors and the sources read files and relative image
paths, so a remote directory or file is copied once into a local cache and the local
path is used from then on. fsspec does the transfer (``gcsfs`` for ``gs://``: the
``gcs`` extra); orbax checkpoint directories take ``gs://`` natively.

``hf://ORG/NAME`` (optionally ``hf://ORG/NAME@REVISION``) is a Hugging Face Hub model:
``huggingface_hub.snapshot_download`` puts it in the Hugging Face cache (``HF_HOME``),
once per host, and later calls find it there. ``HF_TOKEN`` in the environment reaches
gated or private repositories.
"""

from __future__ import annotations

import hashlib
import os

from absl import logging

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "papo_jax")


def is_remote(path: str) -> bool:
  return "://" in str(path) and not str(path).startswith("file://")


HF_PREFIX = "hf://"


def parse_hf_url(url: str) -> tuple[str, str | None]:
  """``hf://ORG/NAME[@REVISION]`` -> (repo id, revision or None)."""
  spec = url[len(HF_PREFIX):].strip("/")
  repo, _, revision = spec.partition("@")
  if repo.count("/") != 1 or not all(repo.split("/")):
    raise ValueError(f"{url!r}: a Hugging Face model is hf://ORG/NAME or hf://ORG/NAME@REVISION")
  return repo, revision or None


def _hf_snapshot(url: str) -> str:
  """The local snapshot directory of a Hub model, downloaded into the Hugging Face cache if needed."""
  from huggingface_hub import snapshot_download
  repo, revision = parse_hf_url(url)
  logging.info("fetching %s (revision %s) through the Hugging Face cache", repo, revision or "main")
  # The cache is keyed by repo + revision and files are locked while downloading, so several
  # processes on one host share one copy; a finished snapshot is not downloaded again.
  return snapshot_download(repo, revision=revision)


def localize(path: str, cache_dir: str | None = None) -> str:
  """A local path with the contents of ``path`` (a file or a directory); local paths pass through.

  The copy lands in ``cache_dir/<hash of the URL>/<basename>`` and is reused when a
  completed copy is already there.
  """
  path = str(path)
  if path.startswith(HF_PREFIX):
    return _hf_snapshot(path)
  if path.startswith("file://"):
    return path[len("file://"):]
  if not is_remote(path):
    return path
  import fsspec
  fs, root = fsspec.core.url_to_fs(path)
  key = hashlib.sha1(path.rstrip("/").encode()).hexdigest()[:16]
  dest_root = os.path.join(cache_dir or DEFAULT_CACHE, key)
  dest = os.path.join(dest_root, os.path.basename(root.rstrip("/")) or "data")
  done = os.path.join(dest_root, ".complete")
  if os.path.exists(done):
    return dest
  if not fs.exists(root):
    raise FileNotFoundError(f"{path!r} does not exist")
  os.makedirs(dest_root, exist_ok=True)
  logging.info("copying %s to %s", path, dest)
  if fs.isdir(root):
    for src in fs.find(root):
      rel = os.path.relpath(src, root.rstrip("/"))
      os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
      fs.get_file(src, os.path.join(dest, rel))
  else:
    fs.get_file(root, dest)
  with open(done, "w") as f:
    f.write(path)
  return dest
