"""Writing array_record shards (tfds layout) and reading them back with sources.ArrayRecordLlavaSource."""

import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import array_record as AR
from llava_jax.data import sources as S
from llava_jax.data.images import load_image
from llava_jax.data.records import image_list


def test_array_record_round_trip(llava_files):
  d, recs = llava_files
  recs = recs + [{"id": "bmp", "image": "img5.bmp", "conversations": []}]
  out = d / "ar"
  report = AR.write_array_record(recs, out, image_root=d, num_shards=3, split="train")
  assert report.written == len(recs) and report.skipped == {}
  assert sorted(os.listdir(out)) == ["dataset_info.json", "features.json"] + [
      f"llava-train.array_record-0000{k}-of-00003" for k in range(3)
  ]
  assert report.shard_lengths == [3, 3, 3]  # record k -> shard k % 3
  src = S.ArrayRecordLlavaSource(out, "train")
  got = {r["id"]: r for r in src}
  want = {S.normalize_record(r, default_id=f"llava-train:{i}")["id"]: r for i, r in enumerate(recs)}
  assert set(got) == set(want) and "llava-train:7" in got  # a record without id gets split:index
  for sid, r in got.items():
    assert r["conversations"] == want[sid]["conversations"]
    assert r["image_names"] == image_list(want[sid])  # as the record names them, not absolute paths
  # PNG bytes are stored unchanged; BMP is re-encoded as JPEG with the same pixels (up to JPEG error).
  assert got["r1"]["images"] == [(d / "img1.png").read_bytes()]
  assert len(got["multi"]["images"]) == 2
  jpeg = got["bmp"]["images"][0]
  assert jpeg[:3] == b"\xff\xd8\xff"
  assert np.abs(np.asarray(load_image(jpeg), int) - 200).max() <= 3
  assert pickle.loads(pickle.dumps(src))[4] == src[4]


def test_array_record_is_readable_by_array_record_and_tfds(llava_files):
  d, recs = llava_files
  out = d / "ar"
  AR.write_array_record(recs[:4], out, image_root=d, num_shards=2, split="train")
  AR.write_array_record(recs[4:6], out, image_root=d, num_shards=1, split="validation")  # keeps "train"
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  raw = ArrayRecordDataSource(S.find_shards(out, "train"))
  assert sorted(S.decode_record(raw[i])["id"] for i in range(len(raw))) == ["r0", "r1", "r2", "r3"]
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(os.fspath(out))
  assert set(builder.info.splits) == {"train", "validation"}
  ds = builder.as_data_source("validation")
  assert len(ds) == 2
  ex = ds[0]
  assert ex["id"] == b"r4" and json.loads(ex["conversations"]) == recs[4]["conversations"]
  assert list(ex["images"]) == [(d / "img4.png").read_bytes()]
  assert len(builder.as_data_source("train")) == 4


def test_conversion_counts_missing_and_bad_images(llava_files, caplog):
  d, recs = llava_files
  (d / "junk.gif").write_bytes(b"GIF89a not really")
  recs = recs[:3] + [
      {"id": "gone", "image": "nothere.png", "conversations": []},
      {"id": "junk", "image": "junk.gif", "conversations": []},
      {"id": "clip", "video": "clip.mp4", "conversations": []},  # never stored without its video
  ]
  report = AR.write_array_record(recs, d / "ar", image_root=d, split="train")
  assert report.written == 3
  assert report.skipped == {"missing_image": 1, "bad_image": 1, "has_video": 1}
  assert report.skipped_ids == [("gone", "missing_image"), ("junk", "bad_image"), ("clip", "has_video")]
  assert "'clip'" in caplog.text and "hold images only" in caplog.text
  assert "'gone'" in caplog.text and "nothere.png" in caplog.text
  assert [r["id"] for r in S.ArrayRecordLlavaSource(d / "ar")] == ["r0", "r1", "r2"]
  with pytest.raises(ValueError, match=r"id 'gone'.*missing_image.*nothere.png"):
    AR.write_array_record(recs, d / "ar2", image_root=d, split="train", policy="raise")


def test_rewriting_a_split_replaces_its_shards(llava_files):
  d, recs = llava_files
  AR.write_array_record(recs[:3], d / "ar", image_root=d, num_shards=3)
  AR.write_array_record(recs[:2], d / "ar", image_root=d, num_shards=1)
  assert len(S.find_shards(d / "ar")) == 1 and len(S.ArrayRecordLlavaSource(d / "ar")) == 2
  with pytest.raises(FileNotFoundError, match="validation"):
    S.find_shards(d / "ar", "validation")


def test_stored_image_bytes_keeps_jpeg_and_png():
  buf = io.BytesIO()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="JPEG")
  assert AR.stored_image_bytes(buf.getvalue()) == buf.getvalue()
  with pytest.raises(ValueError):
    AR.stored_image_bytes(b"neither an image nor a path")
