"""Paths: local files and object storage (``gs://``) through one abstraction.

Every file llava_jax reads or writes (the workdir and all under it, data, images,
tokenizers, converter inputs and outputs, evaluation files) goes through this module, so
``--workdir=gs://bucket/run`` and ``data.train=gs://bucket/data/x.jsonl`` work as local
paths do. A TPU pod needs that: its hosts share no disk.

Why etils.epath (over fsspec/gcsfs called directly): orbax writes checkpoints through
epath, so the workdir's other files use the same path type, client and credentials as
its checkpoints, and big_vision/tfds code reads the same way. epath's ``gs://`` backend
is fsspec's gcsfs whenever tensorflow is absent (``EPATH_USE_TF`` is defaulted to false
here, so it is gcsfs even when tensorflow is installed: one HTTP client and one set of
credentials for everything). epath has no conditional writes, so the operations that
must stay atomic on a bucket (below) call the GCS JSON API through the same gcsfs file
system (its session, retries and ``STORAGE_EMULATOR_HOST``). Array data of checkpoints is
written by tensorstore (orbax), which has its own GCS client.

Schemes:

- local paths: everything.
- ``gs://``: everything (tested against a GCS emulator: ``tests/gcs_emulator.py``).
- ``s3://``, ``az://``, ``hf://``: inputs only (data, images, tokenizers, checkpoints to
  convert), through the same epath calls when their fsspec package (s3fs, adlfs,
  huggingface_hub) is installed; untested here. A workdir or any output there is refused
  before any work: the lock and the append-only files need generation preconditions,
  written here for GCS only, and orbax commits non-GCS checkpoints by renaming, which is
  not atomic on S3.
- anything else (``http://``, ``file://``, ``memory://`` …) is refused with the list above.

What stays atomic on a bucket, where there is no rename (``write_atomic``,
``create_only``, ``replace_if``, ``delete_if``, ``Appender``):

- a whole-file write (``run.json``, ``eval.json``, converted weights) is one upload: GCS
  publishes an object only when its upload completes, so a reader sees the old or the new
  file, never a part (locally: a temporary file renamed over the old one);
- the run lock is created with ``ifGenerationMatch=0`` (create-only: exactly one of two
  racing trainers succeeds), refreshed and taken over with ``ifGenerationMatch=<the
  generation read>`` and deleted the same way, so a takeover never removes a lock
  someone else just took;
- appends (``metrics.jsonl``, answer files, logs) upload the new lines as a separate
  object and compose ``[file, part]`` into the file with ``ifGenerationMatch`` of the
  file's last generation: each publish adds whole lines atomically, and a second writer
  is detected (HTTP 412) instead of interleaving. Locally, appends are flushed writes,
  and a line cut by a kill is repaired by the readers.

Remote files that are read at random offsets by C/C++ code or by every grain worker
(annotation JSON/JSONL files, array_record shards, safetensors) are copied once into a
local cache (``local_copy``; ``$LLAVA_JAX_CACHE``, default ``~/.cache/llava_jax``), keyed
by path, size and generation; images, tokenizers and question files are read directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterator

READ_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
WRITE_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def _epath():
  """etils.epath, imported on first use of a remote path (~1 s of imports a local run skips)."""
  global _EPATH
  if _EPATH is None:
    os.environ.setdefault("EPATH_USE_TF", "false")  # epath's gs:// backend: gcsfs, not tf.io.gfile
    import fsspec
    from etils import epath
    # gcsfs caches directory listings forever by default, so a file another process (or
    # host) wrote later would stay invisible to exists()/listdir(); a pod shares a bucket.
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
    _EPATH = epath
  return _EPATH


_EPATH = None


class UnsupportedPathError(ValueError):
  """A path whose scheme llava_jax cannot read (or, for outputs, write) with its guarantees."""


class ConcurrentWriteError(RuntimeError):
  """An object changed under a writer that holds it (another trainer on the same workdir)."""


# ----------------------------------------------------------------------------- schemes


def scheme(path) -> str | None:
  """``"gs"`` for ``gs://b/x``; None for a local path."""
  m = _SCHEME.match(os.fspath(path))
  return m.group(1).lower() if m else None


def is_remote(path) -> bool:
  return path is not None and scheme(path) is not None


def check(path, what: str = "path", *, write: bool = False) -> str:
  """``os.fspath(path)`` if llava_jax can read it (``write``: and write under it).

  Raises:
    UnsupportedPathError: naming ``what`` (e.g. ``--workdir``), the scheme, what is
      supported and why, or the package to install.
  """
  s = os.fspath(path)
  sch = scheme(s)
  if sch is None:
    return s
  supported = (
      "local paths and gs:// (everything); s3://, az://, hf:// for inputs only"
      " (with s3fs, adlfs or huggingface_hub installed)"
  )
  if sch not in READ_SCHEMES:
    hint = " (write a plain local path instead of file://)" if sch == "file" else ""
    raise UnsupportedPathError(f"{what} {s!r}: the scheme {sch}:// is not supported{hint}; supported: {supported}")
  if write and sch not in WRITE_SCHEMES:
    raise UnsupportedPathError(
        f"{what} {s!r}: {sch}:// is supported for inputs only. Outputs (workdirs, checkpoints, "
        "answers, converted weights) need conditional writes for the run lock and the "
        "append-only files, implemented for GCS generation preconditions only, and orbax "
        "commits non-GCS checkpoints by a rename that is not atomic there. Use a local "
        "path or gs://."
    )
  package = READ_SCHEMES[sch]
  if importlib.util.find_spec(package) is None:
    raise UnsupportedPathError(f"{what} {s!r}: {sch}:// needs the {package} package (pip install {package})")
  return s


def as_path(path, what: str = "path"):
  """An ``etils.epath.Path`` (pathlib-like: ``/``, ``read_bytes``, ``glob``, ``exists`` …);
  a ``pathlib.Path`` for a local path."""
  s = check(path, what)
  if not is_remote(s):
    import pathlib

    return pathlib.Path(s)
  return _epath().Path(s)


def join(base, *parts) -> str:
  """``base/part/…`` as a string; a ``gs://`` base keeps its scheme."""
  return os.path.join(os.fspath(base), *(os.fspath(p) for p in parts))


def absolute(path) -> str:
  """A local path made absolute; a URL unchanged (``os.path.abspath`` would make
  ``gs://b/x`` into ``$PWD/gs:/b/x``)."""
  s = os.fspath(path)
  return s if is_remote(s) else os.path.abspath(s)


# ----------------------------------------------------------------------------- plain file operations


def exists(path) -> bool:
  return as_path(path).exists()


def isdir(path) -> bool:
  return as_path(path).is_dir()


def isfile(path) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  p = as_path(path)
  return p.exists() and not p.is_dir()


def listdir(path) -> list[str]:
  """Names in a directory (a prefix on a bucket), sorted."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  return sorted(p.name for p in as_path(path).iterdir())


def glob(pattern) -> list[str]:
  """Paths matching ``dir/pattern`` (``*``, ``?``, ``[…]`` in the last parts), sorted."""
  s = os.fspath(pattern)
  if not is_remote(s):
    import glob as glob_lib

    return sorted(glob_lib.glob(s))
  base, rest = _split_glob(s)
  return sorted(os.fspath(p) for p in as_path(base).glob(rest))


def _split_glob(pattern: str) -> tuple[str, str]:
  parts = pattern.split("/")
  k = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts) - 1)
  return "/".join(parts[:k]) or ".", "/".join(parts[k:])


def makedirs(path) -> None:
  """Creates a directory and its parents (on a bucket nothing: prefixes need no object)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
  else:
    check(path, "output directory", write=True)


def remove(path, missing_ok: bool = True) -> None:
  as_path(path).unlink(missing_ok=missing_ok)


def rmtree(path) -> None:
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    as_path(path).rmtree(missing_ok=True)


def rename(src, dst) -> None:
  """Moves a file or directory. Atomic locally; on a bucket a copy then a delete (used
  only to move a corrupt checkpoint aside, where atomicity does not matter)."""
  if is_remote(src):
    as_path(src).rename(as_path(dst))
  else:
    os.replace(src, dst)


def size(path) -> int:
  return as_path(path).stat().length if is_remote(path) else os.path.getsize(path)


def open_file(path, mode: str = "r", encoding: str | None = None, newline: str | None = None):
  """A file object for reading (``"rb"`` or text ``"r"``, UTF-8 unless ``encoding`` says);
  locally also for writing. A remote file is read whole (``read_bytes``) into memory."""
  if not is_remote(path):
    return open(path, mode, encoding=None if "b" in mode else encoding or "utf-8", newline=newline)
  if "r" not in mode or "+" in mode:
    raise ValueError(
        f"open_file({os.fspath(path)!r}, {mode!r}): remote files are written whole "
        "(write_atomic) or appended (Appender)"
    )
  data = io.BytesIO(read_bytes(path))
  return data if "b" in mode else io.TextIOWrapper(data, encoding=encoding or "utf-8", newline=newline)


def read_bytes(path) -> bytes:
  """The whole file. On a bucket one GET (``cat_file``) rather than a gcsfs file object,
  which would add a metadata request and gcsfs 2026.10's read-ahead prefetcher."""
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  check(path, "input")
  return _fs(path).cat_file(_key(path))


def read_text(path, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def read_json(path) -> Any:
  return json.loads(read_bytes(path))


def write_atomic(path, data: bytes | str) -> None:
  """Writes the whole file so that readers see the old or the new content, never a part
  (locally a temporary file renamed over it; on a bucket one upload)."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  s = os.fspath(path)
  if is_remote(s):
    check(s, "output", write=True)
    as_path(s).write_bytes(data)
    return
  tmp = f"{s}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, s)


def write_json(obj: Any, path, **dump_kwargs) -> None:
  """``json.dump`` through ``write_atomic``."""
  write_atomic(path, json.dumps(obj, **dump_kwargs))


def upload_file(local: str, remote) -> None:
  """Copies a local file to ``remote`` (one upload: published when complete)."""
  check(remote, "output", write=True)
  _fs(remote).put_file(local, _key(remote))


def upload_tree(local_dir: str, remote_dir) -> None:
  """Copies every file under ``local_dir`` to the same relative paths under ``remote_dir``."""
  for root, _, files in os.walk(local_dir):
    for name in sorted(files):
      full = os.path.join(root, name)
      upload_file(full, join(remote_dir, os.path.relpath(full, local_dir)))


@contextlib.contextmanager
def staged_dir(out_dir) -> Iterator[str]:
  """A local directory to write ``out_dir``'s files into: ``out_dir`` itself when local;
  for a bucket a temporary directory uploaded when the block ends without error (for
  writers that need a local file: array_record, safetensors, the synthetic dataset)."""
  if not is_remote(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    yield os.fspath(out_dir)
    return
  check(out_dir, "output directory", write=True)
  with tempfile.TemporaryDirectory(prefix="llava_jax_stage_") as tmp:
    yield tmp
    upload_tree(tmp, out_dir)


def cache_dir() -> str:
  return os.environ.get("LLAVA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llava_jax")


def local_copy(path) -> str:
  """A local file with ``path``'s content: ``path`` itself when local; for a remote file a
  copy in ``cache_dir()`` (downloaded once per path, size and generation; several
  processes on a host may race to write it, each renames a complete copy into place)."""
  s = os.fspath(path)
  if not is_remote(s):
    return s
  check(s, "input")
  info = _fs(s).info(_key(s))
  version = f"{s}|{info.get('size')}|{info.get('generation') or info.get('ETag') or info.get('mtime')}"
  digest = hashlib.sha256(version.encode()).hexdigest()[:20]
  target = os.path.join(cache_dir(), digest, os.path.basename(s))
  if os.path.exists(target) and os.path.getsize(target) == int(info.get("size", -1)):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  _fs(s).get_file(_key(s), tmp)  # streamed to disk
  os.replace(tmp, target)
  return target


# ----------------------------------------------------------------------------- GCS conditional writes


def _fs(path):
  """The fsspec file system epath uses for ``path`` (gcsfs for gs://)."""
  _epath()
  from etils.epath import backend

  return backend.fsspec_backend.fs(os.fspath(path))


def _key(path) -> str:
  return _SCHEME.sub("", os.fspath(path))


def _bucket_key(path) -> tuple[str, str]:
  bucket, _, key = _key(path).partition("/")
  return bucket, key


def _require_gcs(path, what: str):
  if scheme(path) != "gs":
    raise UnsupportedPathError(f"{what} {os.fspath(path)!r}: conditional writes are implemented for gs:// only")


def _call(path, method: str, url: str, *args, **kwargs):
  fs = _fs(path)
  return fs.call(method, url, *args, **kwargs)


def _upload_if(path, data: bytes, generation: str) -> str | None:
  """Uploads ``data`` if the object's generation is ``generation`` ("0": absent).
  Returns the new generation, or None when the precondition failed (HTTP 412)."""
  from urllib.parse import quote

  bucket, key = _bucket_key(path)
  fs = _fs(path)
  try:
    out = fs.call(
        "POST",
        f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
        uploadType="media",
        name=key,
        ifGenerationMatch=str(generation),
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        json_out=True,
    )
  except FileExistsError:  # gcsfs maps 412 Precondition Failed to FileExistsError
    return None
  return str(out["generation"])


def stat_object(path) -> dict | None:
  """``{"generation": str, "mtime": float (server time, s), "size": int}``, None if absent."""
  _require_gcs(path, "stat")
  bucket, key = _bucket_key(path)
  try:
    meta = _call(path, "GET", "b/{}/o/{}", bucket, key, json_out=True)
  except FileNotFoundError:
    return None
  return {
      "generation": str(meta["generation"]),
      "size": int(meta.get("size", 0)),
      "mtime": _parse_time(meta.get("updated") or meta.get("timeCreated")),
  }


def read_object(path) -> tuple[bytes, dict] | None:
  """(content, ``stat_object``) of one generation of the object, None if absent."""
  meta = stat_object(path)
  if meta is None:
    return None
  bucket, key = _bucket_key(path)
  try:
    _, data = _call(path, "GET", "b/{}/o/{}", bucket, key, alt="media", generation=meta["generation"])
  except FileNotFoundError:
    return None
  return data, meta


def create_only(path, data: bytes) -> str | None:
  """Creates the object if it does not exist (``ifGenerationMatch=0``): its generation,
  or None if it already existed."""
  _require_gcs(path, "create_only")
  return _upload_if(path, data, "0")


def replace_if(path, data: bytes, generation: str) -> str | None:
  """Replaces the object if its generation is still ``generation``: the new generation, or
  None if it changed (or vanished) in between."""
  _require_gcs(path, "replace_if")
  if str(generation) == "0":
    raise ValueError("replace_if needs an existing object's generation; use create_only")
  return _upload_if(path, data, generation)


def delete_if(path, generation: str) -> bool:
  """Deletes the object if its generation is still ``generation``; whether it did."""
  _require_gcs(path, "delete_if")
  bucket, key = _bucket_key(path)
  try:
    _call(path, "DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))
  except (FileExistsError, FileNotFoundError):
    return False
  return True


def _compose(path, parts: list[str], generation: str) -> str | None:
  bucket, key = _bucket_key(path)
  body = {
      "sourceObjects": [{"name": _bucket_key(p)[1]} for p in parts],
      "destination": {"contentType": "application/octet-stream"},
  }
  try:
    out = _call(
        path, "POST", "b/{}/o/{}/compose", bucket, key, ifGenerationMatch=str(generation), json=body, json_out=True
    )
  except FileExistsError:
    return None
  return str(out["generation"])


def _parse_time(value) -> float:
  if not value:
    return 0.0
  import datetime

  return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class Appender:
  """Appends whole records (lines) to a file.

  Locally: ``append`` writes and flushes (a kill can cut the last line; readers repair it).
  On a bucket: ``append`` buffers and ``flush`` publishes everything buffered as one
  atomic compose (see the module docstring), so the object only ever holds whole
  records; a change by anyone else since the last publish raises ConcurrentWriteError.
  Every ``REUPLOAD_EVERY`` publishes the file is uploaded whole, which keeps its GCS
  component count small.
  """

  REUPLOAD_EVERY = 512

  def __init__(self, path):
    self.path = check(path, "output", write=True)
    self.remote = is_remote(self.path)
    self._pending: list[bytes] = []
    self._publishes = 0
    if not self.remote:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open(self.path, "ab")
      return
    meta = stat_object(self.path)
    self._generation = "0" if meta is None else meta["generation"]
    self._size = 0 if meta is None else meta["size"]

  def append(self, data: bytes | str) -> None:
    data = data.encode("utf-8") if isinstance(data, str) else data
    if self.remote:
      self._pending.append(data)
    else:
      self._file.write(data)
      self._file.flush()

  def flush(self) -> None:
    if not self.remote or not self._pending:
      return
    chunk, self._pending = b"".join(self._pending), []
    self._publishes += 1
    if self._generation == "0":
      new = create_only(self.path, chunk)
    elif self._publishes % self.REUPLOAD_EVERY == 0:
      current = read_object(self.path)
      new = (
          None
          if current is None or current[1]["generation"] != self._generation
          else replace_if(self.path, current[0] + chunk, self._generation)
      )
    else:
      part = f"{self.path}.append-{uuid.uuid4().hex}"
      part_generation = create_only(part, chunk)
      if part_generation is None:
        raise ConcurrentWriteError(f"{part}: a fresh name already exists")
      try:
        new = _compose(self.path, [self.path, part], self._generation)
      finally:
        delete_if(part, part_generation)
    if new is None:
      raise ConcurrentWriteError(
          f"{self.path} changed since this process last wrote it (generation "
          f"{self._generation}): another writer on the same file? Nothing was appended."
      )
    self._generation, self._size = new, self._size + len(chunk)

  def close(self) -> None:
    if self.remote:
      self.flush()
    else:
      self._file.close()
