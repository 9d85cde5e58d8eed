"""Random-access record sources: parquet (Hub layout), JSON lines, HF `datasets` dirs,
and the built-in synthetic task.

Every source has `len(src)`, `src.name` and `src.record(i)`, which returns the canonical
record

  {record_id: int, origin: str, problem: str, answer: str, images: [bytes | PIL], kind: str}

or raises `RecordError(reason, message)` naming the record. Image items may be raw
bytes, `{bytes, path}` dicts (the Hub/`datasets` Image layout), or paths (relative to
the data file's directory). Nothing is decoded here; see `images.decode_image`.
"""

import dataclasses
import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from papo_jax.data import synthetic as synthetic_lib


class RecordError(ValueError):
  """A bad record; `reason` is the skip counter it goes to."""

  def __init__(self, reason, message):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Fields:
  """Column names of a source (ViRL39K's by default); `kind` is optional."""
  problem: str = "problem"
  answer: str = "answer"
  images: str = "images"
  kind: str = "kind"


def _image_item(item, base_dir, where):
  """One image entry → bytes or PIL image (reads relative paths)."""
  if isinstance(item, (bytes, bytearray, memoryview)):
    return bytes(item)
  if isinstance(item, dict):
    if item.get("bytes") is not None:
      return bytes(item["bytes"])
    item = item.get("path")
  if isinstance(item, str) and item:
    path = item if os.path.isabs(item) else os.path.join(base_dir or "", item)
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise RecordError("image_missing", f"{where}: cannot read image file {path!r}: {e}") from e
  if hasattr(item, "mode") and hasattr(item, "size"):  # a PIL image
    return item
  raise RecordError("image_missing", f"{where}: image entry has no bytes or path: {str(item)[:80]!r}")


def _user_text(messages, where):
  """The last user turn of a chat ``messages`` list, images as ``<image>`` placeholders."""
  users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
  if not users:
    raise RecordError("missing_field", f"{where}: messages hold no user turn")
  content = users[-1].get("content")
  if isinstance(content, str):
    return content
  parts = []
  for part in content or []:
    if isinstance(part, dict) and part.get("type") == "image":
      parts.append("<image>")
    elif isinstance(part, dict) and part.get("type") == "text":
      parts.append(str(part.get("text", "")))
  return "".join(parts)


def normalize_record(row, fields, record_id, origin, base_dir=None):
  """A raw row (dict) → the canonical record dict, or RecordError."""
  where = f"record {record_id} of {origin}"
  out = {"record_id": int(record_id), "origin": origin}
  for key, col in (("problem", fields.problem), ("answer", fields.answer)):
    val = row.get(col)
    if val is None and key == "problem":
      val = row.get("messages")   # chat-format datasets: the prompt is the last user turn
    if val is None:
      raise RecordError("missing_field", f"{where}: missing field {col!r}")
    if key == "problem" and isinstance(val, (list, tuple)):
      val = _user_text(val, where)
    out[key] = str(val)
  images = row.get(fields.images)
  if images is None:
    raise RecordError("missing_field", f"{where}: missing field {fields.images!r}")
  if isinstance(images, (bytes, bytearray, str, dict)) or hasattr(images, "mode"):
    images = [images]
  out["images"] = [_image_item(it, base_dir, where) for it in images]
  kind = row.get(fields.kind) if fields.kind else None
  out["kind"] = str(kind) if kind is not None else ""
  out["answer"] = out["answer"].strip()
  return out


class TableSource:
  """An in-memory pyarrow Table (only the needed columns) with record access."""

  def __init__(self, table, fields, name, base_dir):
    have = set(table.column_names) | ({fields.problem} if "messages" in table.column_names else set())
    missing = [c for c in (fields.problem, fields.answer, fields.images) if c not in have]
    if missing:
      raise ValueError(f"{name}: columns {missing} not found; it has {table.column_names}")
    cols = [c for c in (fields.problem, fields.answer, fields.images, fields.kind, "messages")
            if c and c in table.column_names]
    self.table = table.select(cols).combine_chunks()
    self._columns = {c: self.table.column(c) for c in cols}
    self.fields, self.name, self.base_dir = fields, name, base_dir

  def __len__(self):
    return self.table.num_rows

  def raw(self, i):
    return {c: col[i].as_py() for c, col in self._columns.items()}

  def record(self, i):
    return normalize_record(self.raw(i), self.fields, i, self.name, self.base_dir)


def _expand(path, pattern):
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", pattern), recursive=True))
  else:
    files = sorted(glob.glob(path))
  if not files:
    raise FileNotFoundError(f"no {pattern} files at {path!r}")
  return files


def parquet_source(path, fields=Fields()):
  """One parquet file, a glob, or a directory of parquet files (Hub layout)."""
  files = _expand(path, "*.parquet")
  tables = []
  for f in files:
    names = pq.read_schema(f).names
    cols = [c for c in (fields.problem, fields.answer, fields.images, fields.kind) if c in names]
    if fields.problem not in names and "messages" in names:
      cols.append("messages")
    tables.append(pq.read_table(f, columns=cols))
  table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
  name = os.path.basename(files[0]) if len(files) == 1 else f"{path} ({len(files)} files)"
  return TableSource(table, fields, name, os.path.dirname(files[0]))


def hf_datasets_source(path, fields=Fields()):
  """A directory written by `datasets.Dataset.save_to_disk` (Arrow stream files), read
  with pyarrow alone (no `datasets` dependency)."""
  with open(os.path.join(path, "state.json")) as f:
    state = json.load(f)
  tables = []
  for entry in state["_data_files"]:
    with pa.memory_map(os.path.join(path, entry["filename"])) as mm:
      tables.append(pa.ipc.open_stream(mm).read_all())
  table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
  return TableSource(table, fields, os.path.basename(os.path.normpath(path)), path)


class JsonlSource:
  """JSON lines: one object per line; image paths relative to the file."""

  def __init__(self, path, fields=Fields()):
    self.path, self.fields = path, fields
    self.name = os.path.basename(path)
    self.base_dir = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
      self._lines = [ln for ln in f.read().splitlines() if ln.strip()]

  def __len__(self):
    return len(self._lines)

  def raw(self, i):
    try:
      row = json.loads(self._lines[i])
    except json.JSONDecodeError as e:
      raise RecordError("bad_json", f"record {i} of {self.name}: invalid JSON: {e}") from e
    if not isinstance(row, dict):
      raise RecordError("bad_json", f"record {i} of {self.name}: not a JSON object")
    return row

  def record(self, i):
    return normalize_record(self.raw(i), self.fields, i, self.name, self.base_dir)


class SyntheticSource:
  """The built-in synthetic task (records drawn on demand from (seed, index))."""

  def __init__(self, num_records=1024, seed=0, difficulty=1, image_size=56,
               kinds=synthetic_lib.KINDS):
    self.num_records, self.seed, self.difficulty = num_records, seed, difficulty
    self.image_size, self.kinds = image_size, tuple(kinds)
    self.name = (f"synthetic(seed={seed}, difficulty={difficulty})" if self.kinds == synthetic_lib.KINDS
                 else f"synthetic(seed={seed}, difficulty={difficulty}, kinds={','.join(self.kinds)})")
    self.fields = Fields()

  def __len__(self):
    return self.num_records

  def raw(self, i):
    return synthetic_lib.make_example(i, self.seed, self.difficulty, self.image_size, self.kinds)

  def record(self, i):
    return normalize_record(self.raw(i), self.fields, i, self.name)


def make_source(source, path=None, fields=Fields(), **synthetic_kwargs):
  """source: 'parquet' | 'jsonl' | 'hf_datasets' | 'synthetic'."""
  if source == "parquet":
    return parquet_source(path, fields)
  if source == "jsonl":
    return JsonlSource(path, fields)
  if source == "hf_datasets":
    return hf_datasets_source(path, fields)
  if source == "synthetic":
    return SyntheticSource(**synthetic_kwargs)
  raise ValueError(f"unknown data source {source!r} (parquet, jsonl, hf_datasets, synthetic)")
