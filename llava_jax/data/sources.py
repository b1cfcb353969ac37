"""Sample sources: LLaVA JSON / JSONL files and array_record shards, as grain random-access sources.

    src = LlavaJsonSource("llava_v1_5_mix665k.json", image_root="/data/images")
    src = ArrayRecordLlavaSource("/data/llava_ar", split="train")   # written by array_record.py

Both sources implement grain's `RandomAccessDataSource` protocol (`__len__`,
`__getitem__`, picklable for worker processes) and return the same record:

    {"id": str, "conversations": [{"from": "human" | "gpt", "value": str}, ...],
     "images": [str path | bytes, ...]}      # [] for a text-only sample

`images` holds file paths (LlavaJsonSource; `image_root` joined) or the encoded
file bytes (ArrayRecordLlavaSource); `llava_jax.data.images.load_image`
accepts either. The input record may name its images LLaVA's way (`"image":
"a.jpg"` or a list) or as `"images": [...]`, not both (`records.image_list`).

JSON files. A `.jsonl` file is indexed by line (byte offsets, one pass over
the file in 16 MiB blocks). A `.json` file (LLaVA's usual top-level array) is
indexed the same way: one pass of a small scanner records the byte range of
each top-level element (strings are skipped by a C regex, so only structural
characters reach Python; ~10 s for LLaVA-665k's 1 GB). Neither loads the
whole file: a record is parsed when it is read (`os.pread`), so every grain
worker holds just the offsets (16 bytes per record). Reading images from a
network file system one file at a time is slow; for real training, convert
once with `array_record.write_array_record` and read the shards.

On a bucket (`gs://`, `llava_jax.storage`): a JSON/JSONL file and array_record
shards are copied once into the local cache (`storage.local_copy`; shards one after
another), since they are read at random offsets by every worker (and array_record's
reader is C++ on local files); images named by JSON records stay in the bucket and are
read by the pipeline's threads (`pipeline.default_read_threads`).

array_record shards (tfds layout, see `llava_jax.data.array_record`): each
record is a serialized `tf.train.Example` with the features of
`record_features` (`id`, `conversations` as JSON, `images` as encoded bytes,
`image_names`); `ArrayRecordLlavaSource` decodes them with `decode_record`.
The directory is also readable with `tfds.builder_from_directory`.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from llava_jax import storage
from llava_jax.data.records import RecordError, image_list, sample_id_of, video_list

Record = dict[str, Any]

_BLOCK = 16 << 20
# A JSON string (skipped whole, in C) or one structural character.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


# ----------------------------------------------------------------------------- record normalisation


def resolve_image(image, image_root: str | None):
  """A path joined to `image_root` (an absolute path stays as is); bytes, or no root, unchanged."""
  if isinstance(image, (bytes, bytearray, memoryview)) or image_root is None:
    return image
  if storage.is_remote(image):  # a URL stays as is
    return os.fspath(image)
  return os.path.join(image_root, os.fspath(image))  # an absolute path stays as is


def normalize_record(
    record: Mapping, image_root: str | os.PathLike | None = None, *, default_id: str | None = None
) -> Record:
  """A LLaVA JSON record -> `{"id", "conversations", "images"}` (image paths joined to `image_root`),
  plus `"videos"` (joined likewise) when it names any.

  Raises:
    RecordError: the record names images under both "image" and "images" (videos: "video", "videos").
  """
  root = None if image_root is None else os.fspath(image_root)
  sid = sample_id_of(record)
  if sid == "<no id>" and default_id is not None:
    sid = default_id
  out = {
      "id": sid,
      "conversations": record.get("conversations"),
      "images": [resolve_image(im, root) for im in image_list(record)],
  }
  videos = video_list(record)
  if videos:  # paths under the same root (LLaVA-NeXT's video_folder: point image_root at it)
    out["videos"] = [resolve_image(v, root) for v in videos]
  return out


def bad_record(sample_id: str, detail: str) -> Record:
  """A record the source could not read: the pipeline counts it as `bad_record` (the
  data policy skips or raises), naming `sample_id` (file:index) and `detail`."""
  return {"id": sample_id, "conversations": None, "images": [], "error": detail}


# ----------------------------------------------------------------------------- JSON / JSONL


def index_jsonl(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Byte ranges of the non-empty lines of a JSONL file.

  Returns:
    (starts, ends): int64[N] each; record i is `file[starts[i]:ends[i]]`
    (without the newline). Lines holding only "\\r" or nothing are skipped.
  """
  starts, ends = [], []
  with open(path, "rb") as f:
    pos, line_start = 0, 0
    while True:
      block = f.read(_BLOCK)
      if not block:
        break
      nl = np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + pos
      s = np.concatenate([[line_start], nl[:-1] + 1]) if len(nl) else np.zeros(0, np.int64)
      starts.append(s)
      ends.append(nl)
      if len(nl):
        line_start = int(nl[-1]) + 1
      pos += len(block)
    if line_start < pos:  # last line without a newline
      starts.append(np.asarray([line_start], np.int64))
      ends.append(np.asarray([pos], np.int64))
  starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
  ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
  # "\r\n" endings: a line of length 1 may be just "\r"; check those few by reading them.
  keep = ends - starts > 0
  short = np.flatnonzero(ends - starts == 1)
  if len(short):
    with open(path, "rb") as f:
      for i in short:
        f.seek(int(starts[i]))
        keep[i] = f.read(1) not in (b"\r", b" ", b"\t")
  return starts[keep], ends[keep]


def index_json_array(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Byte ranges of the top-level elements of a JSON array file (`[{...}, {...}]`), without parsing them.

  Returns:
    (starts, ends): int64[N]; `json.loads(file[starts[i]:ends[i]])` is element i
    (the ranges may include surrounding whitespace).

  Raises:
    ValueError: the file is not a JSON array (or its brackets do not balance).
  """
  starts, ends = [], []
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size == 0:
      raise ValueError(f"{path}: empty file, expected a JSON array")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      depth, elem_start, closed = 0, -1, False
      for m in _JSON_TOKEN.finditer(mm):
        c = mm[m.start()]
        if c == 0x22:  # a string: content, never structure
          if depth == 0:
            raise ValueError(f"{path}: expected a top-level JSON array, found a string at byte {m.start()}")
          continue
        if closed:
          raise ValueError(f"{path}: data after the top-level array at byte {m.start()}")
        if c in (0x5B, 0x7B):  # [ {
          if depth == 0:
            if c != 0x5B or mm[: m.start()].strip():
              raise ValueError(f"{path}: expected a top-level JSON array, found {chr(c)!r} at byte {m.start()}")
            elem_start = m.end()
          depth += 1
        elif c in (0x5D, 0x7D):  # ] }
          depth -= 1
          if depth < 0:
            raise ValueError(f"{path}: unbalanced {chr(c)!r} at byte {m.start()}")
          if depth == 0:
            if mm[elem_start : m.start()].strip():
              starts.append(elem_start)
              ends.append(m.start())
            closed = True
        elif depth == 1:  # a comma between top-level elements
          starts.append(elem_start)
          ends.append(m.start())
          elem_start = m.end()
      if depth != 0 or not closed:
        raise ValueError(f"{path}: truncated JSON array ({depth} brackets left open)")
  return np.asarray(starts, np.int64), np.asarray(ends, np.int64)


class LlavaJsonSource:
  """Random access to a LLaVA `.json` (top-level array) or `.jsonl` file; see the module docstring.

  Args:
    path: the annotation file. `.jsonl` is read by line, anything else as a JSON array.
    image_root: directory the records' image paths are relative to (None: as written).

  `source[i]` -> `{"id", "conversations", "images": [path, ...]}`; a record
  without "id" gets `"<file name>:<i>"` so rejections can still be traced.
  """

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None):
    self.path = storage.check(path, "data file")
    self.image_root = None if image_root is None else storage.check(image_root, "image root")
    self._local = storage.local_copy(self.path)  # the file itself when local
    index = index_jsonl if self.path.endswith(".jsonl") else index_json_array
    self._starts, self._ends = index(self._local)
    self._fd = os.open(self._local, os.O_RDONLY)

  def __len__(self) -> int:
    return len(self._starts)

  def read_raw(self, index: int) -> dict:
    """Record `index` exactly as stored (a dict parsed from its JSON)."""
    start, end = int(self._starts[index]), int(self._ends[index])
    text = os.pread(self._fd, end - start, start)  # thread-safe: no shared file position
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(
          f"{self.path}: record {index} (bytes {start}..{end}) is not valid UTF-8 "
          f"at byte {start + e.start}: {text[max(e.start - 20, 0):e.end + 20]!r}"
      ) from e
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(
          f"{self.path}: record {index} (bytes {start}..{end}) is not valid JSON (a line cut short?): {e}"
      ) from e
    if not isinstance(record, dict):
      raise ValueError(
          f"{self.path}: record {index} (bytes {start}..{end}) is a JSON "
          f"{type(record).__name__}, expected an object"
      )
    return record

  def __getitem__(self, index) -> Record:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records in {self.path}")
    index %= len(self)
    default_id = f"{os.path.basename(self.path)}:{index}"
    try:
      raw = self.read_raw(index)
    except ValueError as e:  # bad UTF-8, a cut or invalid line: one bad record, not a dead run
      return bad_record(default_id, str(e))
    try:
      return normalize_record(raw, self.image_root, default_id=default_id)
    except RecordError as e:  # both "image" and "images"
      sid = sample_id_of(raw)
      return bad_record(default_id if sid == "<no id>" else sid, f"{self.path}: record {index}: {e}")

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_fd"]  # a descriptor does not survive pickling; reopen in the worker
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fd = os.open(self._local, os.O_RDONLY)

  def __del__(self):
    fd = self.__dict__.get("_fd")
    if fd is not None:
      try:
        os.close(fd)
      except OSError:
        pass

  def __repr__(self) -> str:
    return f"LlavaJsonSource({self.path!r}, image_root={self.image_root!r}, records={len(self)})"


def iter_records(path: str | os.PathLike) -> Iterable[dict]:
  """The raw records of a LLaVA `.json` / `.jsonl` file, in order (streamed, as `LlavaJsonSource`)."""
  src = LlavaJsonSource(path)
  return (src.read_raw(i) for i in range(len(src)))


# ----------------------------------------------------------------------------- array_record


@functools.lru_cache(maxsize=1)
def record_features():
  """The tfds FeaturesDict of one array_record record (see the module docstring)."""
  import tensorflow_datasets as tfds  # local: ~1 s to import, only the array_record path needs it

  return tfds.features.FeaturesDict(
      {
          "id": tfds.features.Text(),
          "conversations": tfds.features.Text(),  # JSON list of turns
          "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
          "image_names": tfds.features.Sequence(tfds.features.Text()),
      }
  )


def decode_record(raw: bytes) -> Record:
  """Serialized record -> `{"id", "conversations", "images": [bytes, ...], "image_names": [str, ...]}`."""
  ex = record_features().deserialize_example_np(raw)
  as_str = lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b)
  return {
      "id": as_str(ex["id"]),
      "conversations": json.loads(as_str(ex["conversations"])),
      "images": [bytes(b) for b in ex["images"]],
      "image_names": [as_str(n) for n in ex["image_names"]],
  }


def find_shards(path: str | os.PathLike, split: str = "train") -> list[str]:
  """Shard files of `split` in a directory (sorted), or [path] for one file (local or a bucket)."""
  path = storage.check(path, "array_record path")
  if storage.isfile(path):
    return [path]
  suffix = re.compile(rf"-{re.escape(split)}\.array_record-\d+-of-\d+$")
  names = storage.listdir(path) if storage.isdir(path) else None
  files = [storage.join(path, n) for n in names or () if suffix.search(n)]
  if not files:
    raise FileNotFoundError(
        f"no '*-{split}.array_record-*-of-*' shards in {path}: "
        f"found {names if names is not None else 'no such directory'}"
    )
  return sorted(files)


class ArrayRecordLlavaSource:
  """Random access to shards written by `array_record.write_array_record`.

  Args:
    path: the output directory of `write_array_record` (or one shard file,
      or a list of shard files).
    split: which split's shards to read from a directory.

  `source[i]` -> `{"id", "conversations", "images": [bytes, ...], "image_names": [str, ...]}`.
  """

  def __init__(self, path: str | os.PathLike | Sequence[str], split: str = "train"):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    self.files = list(path) if isinstance(path, (list, tuple)) else find_shards(path, split)
    self.split = split
    # Shards on a bucket: copied to the local cache one after another (array_record reads local files).
    local = [storage.local_copy(f) for f in self.files]
    self._source = ArrayRecordDataSource(local)  # picklable: reopens its readers in a worker

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> Record:
    return decode_record(self._source[int(index)])

  def __getitems__(self, indices: Sequence[int]) -> list[Record]:
    return [decode_record(r) for r in self._source.__getitems__([int(i) for i in indices])]

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"ArrayRecordLlavaSource({len(self.files)} shards, split={self.split!r}, records={len(self)})"


class ConcatSource:
  """Several sources as one random-access source (a training mixture, as LLaVA-1.5's 665K
  mix is): record i of the concatenation, in order; shuffling happens in the pipeline."""

  def __init__(self, sources: Sequence):
    if not sources:
      raise ValueError("ConcatSource needs at least one source")
    self.sources = list(sources)
    self._offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index) -> Record:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    index %= len(self)
    k = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self.sources[k][index - int(self._offsets[k])]

  def __repr__(self) -> str:
    return f"ConcatSource({self.sources!r})"


def open_source(paths: str | Sequence[str], image_root: str | None = None):
  """A LLaVA JSON/JSONL file or an array_record directory; several (a list, or one
  comma-separated string) are concatenated."""
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p]
  opened = [ArrayRecordLlavaSource(p) if storage.isdir(p) else LlavaJsonSource(p, image_root) for p in paths]
  return opened[0] if len(opened) == 1 else ConcatSource(opened)
