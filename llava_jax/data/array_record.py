"""Writing LLaVA records with their image bytes into tfds-layout array_record shards.

    report = write_array_record(iter_records("llava_v1_5_mix665k.json"), "/data/llava_ar",
                                image_root="/data/images", num_shards=64, split="train")
    src = sources.ArrayRecordLlavaSource("/data/llava_ar", split="train")   # reading: sources.py

Layout (tfds-compatible). `write_array_record` writes
`out_dir/<name>-<split>.array_record-0000k-of-0000N` plus tfds's
`dataset_info.json` / `features.json` (written by
`tfds.folder_dataset.write_metadata`, which works without TensorFlow), so the
directory is also readable as

    tfds.builder_from_directory(out_dir).as_data_source(split)   # -> dicts of bytes

Each record is a `tf.train.Example` (serialized by tfds's own proto code, no
TensorFlow needed) with the features of `sources.record_features`: `id: Text`,
`conversations: Text` (the turns as JSON), `images: Sequence(bytes)` (encoded
files) and `image_names: Sequence(Text)` (the paths as the records name them).
JPEG and PNG files are stored byte for byte; other formats are decoded and
re-encoded as JPEG (quality 95). Record k of the input goes to shard k % num_shards.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import os
import re
from typing import Iterable, Mapping, Sequence

from llava_jax import storage
from llava_jax.data.images import load_image
from llava_jax.data.records import RecordError, image_list, sample_id_of, video_list
from llava_jax.data.sources import record_features, resolve_image

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def encode_record(
    record: Mapping, image_bytes: Sequence[bytes], image_names: Sequence[str], sample_id: str | None = None
) -> bytes:
  """One record -> serialized `tf.train.Example` bytes (the array_record payload); id defaults to the record's."""
  return record_features().serialize_example(
      {
          "id": sample_id_of(record) if sample_id is None else sample_id,
          "conversations": json.dumps(record.get("conversations"), ensure_ascii=False),
          "images": [bytes(b) for b in image_bytes],
          "image_names": [str(n) for n in image_names],
      }
  )


def stored_image_bytes(image, *, jpeg_quality: int = 95) -> bytes:
  """What the converter stores for one image: JPEG / PNG bytes unchanged, anything else re-encoded as JPEG.

  Args:
    image: a path or the encoded bytes.

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: not JPEG/PNG and not decodable.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    data = bytes(image)
  else:
    data = storage.read_bytes(image)  # local or on a bucket
  if data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC):
    return data
  img = load_image(data)  # ValueError if undecodable
  out = io.BytesIO()
  img.save(out, format="JPEG", quality=jpeg_quality)
  return out.getvalue()


@dataclasses.dataclass
class ConversionReport:
  """What `write_array_record` did.

  Attributes:
    written: records written.
    shard_lengths: records per shard file.
    skipped: records left out, per reason ("missing_image", "bad_image", "bad_record", "has_video").
    skipped_ids: ids of the first 100 skipped records, with their reason.
    files: the shard paths.
  """

  written: int = 0
  shard_lengths: list[int] = dataclasses.field(default_factory=list)
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped_ids: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  files: list[str] = dataclasses.field(default_factory=list)


def shard_paths(out_dir: str | os.PathLike, name: str, split: str, num_shards: int) -> list[str]:
  """tfds file names: `out_dir/<name>-<split>.array_record-0000k-of-0000N`."""
  return [
      os.path.join(os.fspath(out_dir), f"{name}-{split}.array_record-{k:05d}-of-{num_shards:05d}")
      for k in range(num_shards)
  ]


def _other_splits(out_dir: str, split: str) -> list:
  """SplitInfos already recorded in out_dir's dataset_info.json, except `split` (so splits can be added one by one)."""
  import tensorflow_datasets as tfds

  path = os.path.join(out_dir, "dataset_info.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    info = json.load(f)
  return [
      tfds.core.SplitInfo(
          name=s["name"],
          shard_lengths=[int(n) for n in s.get("shardLengths", [])],
          num_bytes=int(s.get("numBytes", 0)),
          filename_template=None,
      )
      for s in info.get("splits", [])
      if s["name"] != split
  ]


def _write_array_record_remote(records, out_dir: str, **kwargs) -> ConversionReport:
  """`write_array_record` into a local staging directory, then uploaded to `out_dir`."""
  name, split = kwargs["name"], kwargs["split"]
  stale = re.compile(rf"^{re.escape(name)}-{re.escape(split)}\.array_record-")
  with storage.staged_dir(out_dir) as local:
    info = storage.join(out_dir, "dataset_info.json")
    if storage.exists(info):  # other splits already there are kept
      with open(os.path.join(local, "dataset_info.json"), "wb") as f:
        f.write(storage.read_bytes(info))
    report = write_array_record(records, local, **kwargs)
    if storage.isdir(out_dir):
      for n in storage.listdir(out_dir):
        if stale.match(n):
          storage.remove(storage.join(out_dir, n))
  report.files = [storage.join(out_dir, os.path.basename(f)) for f in report.files]
  return report


def write_array_record(
    records: Iterable[Mapping],
    out_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    num_shards: int = 1,
    split: str = "train",
    name: str = "llava",
    policy: str = "skip",
    jpeg_quality: int = 95,
) -> ConversionReport:
  """Writes LLaVA records with their image bytes into tfds-layout array_record shards.

  Args:
    records: LLaVA JSON records (`"image"` path or list, or `"images"`), or
      the dicts `LlavaJsonSource` returns (paths already joined).
    out_dir: created if needed; other splits already in it are kept.
    image_root: relative image paths are joined to it.
    num_shards: files to write; record k goes to shard k % num_shards.
    split: split name in the file names and dataset_info.json. A record
      without "id" is stored as "<name>-<split>:<index in records>".
    name: dataset name in the file names.
    policy: a record whose image file is missing ("missing_image") or
      undecodable and not JPEG/PNG ("bad_image"), that names images under
      both "image" and "images" ("bad_record"), or that names videos ("has_video":
      the shards hold images only): "skip" (count, log, leave it out) or "raise"
      (ValueError naming the record id and the image).
    jpeg_quality: for re-encoded images.

  Returns:
    ConversionReport (also logged).

  An `out_dir` on a bucket (`gs://`): the shards are written to a local staging
  directory and uploaded whole when complete (array_record's writer needs a local file).
  """
  from array_record.python import array_record_module  # local: only the converter needs the writer
  import tensorflow_datasets as tfds

  if storage.is_remote(out_dir):
    return _write_array_record_remote(
        records,
        os.fspath(out_dir),
        image_root=image_root,
        num_shards=num_shards,
        split=split,
        name=name,
        policy=policy,
        jpeg_quality=jpeg_quality,
    )

  if policy not in ("skip", "raise"):
    raise ValueError(f"policy must be 'skip' or 'raise', got {policy!r}")
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  pattern = f"{glob.escape(name)}-{glob.escape(split)}.array_record-*"
  for stale in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
    os.remove(stale)  # an earlier conversion with another shard count would otherwise mix in
  report = ConversionReport(shard_lengths=[0] * num_shards, files=shard_paths(out_dir, name, split, num_shards))
  root = None if image_root is None else os.fspath(image_root)
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in report.files]
  try:
    k = 0
    for i, record in enumerate(records):
      sid = sample_id_of(record)
      sid = f"{name}-{split}:{i}" if sid == "<no id>" else sid  # traceable in later rejection logs
      names, blobs, problem = [], [], None
      try:
        images = image_list(record)
        if video_list(record):  # the shards' features hold images only: never drop a video silently
          images, problem = [], (
              "has_video",
              "names videos; array_record shards hold images only: train video data "
              "from its JSON/JSONL (data.train), which reads the files",
          )
      except RecordError as e:  # both "image" and "images"
        images, problem = [], ("bad_record", str(e))
      for image in images:
        path = resolve_image(image, root)
        # The name as the record gives it (relative to image_root): output independent of where data lives.
        names.append("<bytes>" if isinstance(image, (bytes, bytearray, memoryview)) else os.fspath(image))
        try:
          blobs.append(stored_image_bytes(path, jpeg_quality=jpeg_quality))
        except FileNotFoundError as e:
          problem = ("missing_image", f"image {len(blobs)} not found: {e.filename or path}")
        except (OSError, ValueError) as e:
          problem = ("bad_image", f"image {len(blobs)} ({names[-1]}): {e}")
        if problem:
          break
      if problem:
        reason, detail = problem
        report.skipped[reason] = report.skipped.get(reason, 0) + 1
        if len(report.skipped_ids) < 100:
          report.skipped_ids.append((sid, reason))
        msg = f"record {i} (id {sid!r}) not converted ({reason}): {detail}"
        if policy == "raise":
          raise ValueError(msg)
        if report.skipped[reason] <= 10 or report.skipped[reason] % 1000 == 0:
          log.warning("%s [%s #%d]", msg, reason, report.skipped[reason])
        continue
      writers[k % num_shards].write(encode_record(record, blobs, names, sid))
      report.shard_lengths[k % num_shards] += 1
      k += 1
    report.written = k
  finally:
    for w in writers:
      w.close()
  num_bytes = sum(os.path.getsize(p) for p in report.files)
  split_info = tfds.core.SplitInfo(
      name=split, shard_lengths=report.shard_lengths, num_bytes=num_bytes, filename_template=None
  )
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir,
      features=record_features(),
      split_infos=_other_splits(out_dir, split) + [split_info],
      filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      check_data=False,
  )
  log.info(
      "wrote %d records of split %r to %s in %d shards; skipped %s",
      report.written,
      split,
      out_dir,
      num_shards,
      report.skipped or "none",
  )
  return report
