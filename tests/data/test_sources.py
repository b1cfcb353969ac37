"""LLaVA JSON / JSONL sources (byte-offset index, random access, pickling) and the array_record round trip."""
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import sources as S
from llava_jax.data.images import load_image
from llava_jax.data.records import image_list

TRICKY = 'say "hi" [a, {b}] \\ , ] } \u00e9'  # structure characters and escapes inside strings


def _records():
  recs = []
  for i in range(5):
    recs.append({"id": f"r{i}", "image": f"img{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{TRICKY} {i}"}, {"from": "gpt", "value": f"answer, {i}"}]})
  recs.append({"id": "multi", "image": ["img0.png", "img1.png"], "conversations": [
      {"from": "human", "value": "<image>\n<image>\nsame?"}, {"from": "gpt", "value": "no"}]})
  recs.append({"id": 17, "images": ["img2.png"], "conversations": []})  # "images" key, numeric id
  recs.append({"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]})
  return recs


@pytest.fixture()
def data(tmp_path):
  recs = _records()
  for i in range(5):
    Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"img{i}.png")
  Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(tmp_path / "img5.bmp")
  with open(tmp_path / "a.json", "w") as f:
    json.dump(recs, f, indent=2, ensure_ascii=False)
  with open(tmp_path / "a.jsonl", "w", newline="") as f:  # CRLF endings, a blank line, no final newline
    f.write("\r\n".join(json.dumps(r) for r in recs[:3]) + "\r\n\r\n" + "\n".join(json.dumps(r) for r in recs[3:]))
  return tmp_path, recs


def test_json_and_jsonl_give_the_same_records(data):
  d, recs = data
  a = S.LlavaJsonSource(d / "a.json", image_root=d)
  b = S.LlavaJsonSource(d / "a.jsonl", image_root=d)
  assert len(a) == len(b) == len(recs)
  for i in range(len(recs) - 1):
    assert a[i] == b[i]
  assert [a.read_raw(i) for i in range(len(a))] == [b.read_raw(i) for i in range(len(b))] == recs
  assert a[0] == {"id": "r0", "conversations": recs[0]["conversations"], "images": [os.path.join(d, "img0.png")]}
  assert a[5]["images"] == [os.path.join(d, "img0.png"), os.path.join(d, "img1.png")]
  assert a[6]["id"] == "17" and a[6]["images"] == [os.path.join(d, "img2.png")]
  assert a[7]["id"] == "a.json:7" and a[7]["images"] == []  # no id: file and index, for rejection logs
  assert a[-1] == a[7]
  with pytest.raises(IndexError):
    a[8]
  assert S.LlavaJsonSource(d / "a.json")[0]["images"] == ["img0.png"]  # no image_root: as written


def test_json_source_pickles_for_workers(data):
  d, _ = data
  a = S.LlavaJsonSource(d / "a.json", image_root=d)
  b = pickle.loads(pickle.dumps(a))
  assert [b[i] for i in range(len(b))] == [a[i] for i in range(len(a))]


def test_json_index_is_the_element_byte_ranges(tmp_path):
  p = tmp_path / "x.json"
  p.write_text(' [ {"a": "],["} ,\n [1, 2] , "s,t" ,{} ]  \n')
  starts, ends = S.index_json_array(p)
  raw = p.read_bytes()
  assert [json.loads(raw[s:e]) for s, e in zip(starts, ends)] == [{"a": "],["}, [1, 2], "s,t", {}]
  p.write_text("[]")
  assert len(S.index_json_array(p)[0]) == 0
  for bad, why in (('{"a": 1}', "top-level JSON array"), ('[{"a": 1}', "truncated"), ("[1] [2]", "after"),
                   ("", "empty")):
    p.write_text(bad)
    with pytest.raises(ValueError, match=why):
      S.index_json_array(p)


def test_malformed_record_names_file_and_index(tmp_path):
  p = tmp_path / "x.jsonl"
  p.write_text('{"id": "ok", "conversations": []}\n{"id": broken\n')
  src = S.LlavaJsonSource(p)
  assert src[0]["id"] == "ok"
  # Reading: the record comes back as a bad_record the pipeline counts (or raises on).
  assert src[1]["id"] == "x.jsonl:1" and "x.jsonl: record 1" in src[1]["error"]
  with pytest.raises(ValueError, match=r"x.jsonl: record 1"):
    src.read_raw(1)


def test_iter_records_streams_raw_records(data):
  d, recs = data
  assert list(S.iter_records(d / "a.jsonl")) == recs


def test_array_record_round_trip(data):
  d, recs = data
  recs = recs + [{"id": "bmp", "image": "img5.bmp", "conversations": []}]
  out = d / "ar"
  report = S.write_array_record(recs, out, image_root=d, num_shards=3, split="train")
  assert report.written == len(recs) and report.skipped == {}
  assert sorted(os.listdir(out)) == ["dataset_info.json", "features.json"] + [
      f"llava-train.array_record-0000{k}-of-00003" for k in range(3)]
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


def test_array_record_is_readable_by_array_record_and_tfds(data):
  d, recs = data
  out = d / "ar"
  S.write_array_record(recs[:4], out, image_root=d, num_shards=2, split="train")
  S.write_array_record(recs[4:6], out, image_root=d, num_shards=1, split="validation")  # keeps "train"
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


def test_conversion_counts_missing_and_bad_images(data, caplog):
  d, recs = data
  (d / "junk.gif").write_bytes(b"GIF89a not really")
  recs = recs[:3] + [{"id": "gone", "image": "nothere.png", "conversations": []},
                     {"id": "junk", "image": "junk.gif", "conversations": []}]
  report = S.write_array_record(recs, d / "ar", image_root=d, split="train")
  assert report.written == 3
  assert report.skipped == {"missing_image": 1, "bad_image": 1}
  assert report.skipped_ids == [("gone", "missing_image"), ("junk", "bad_image")]
  assert "'gone'" in caplog.text and "nothere.png" in caplog.text
  assert [r["id"] for r in S.ArrayRecordLlavaSource(d / "ar")] == ["r0", "r1", "r2"]
  with pytest.raises(ValueError, match=r"id 'gone'.*missing_image.*nothere.png"):
    S.write_array_record(recs, d / "ar2", image_root=d, split="train", policy="raise")


def test_rewriting_a_split_replaces_its_shards(data):
  d, recs = data
  S.write_array_record(recs[:3], d / "ar", image_root=d, num_shards=3)
  S.write_array_record(recs[:2], d / "ar", image_root=d, num_shards=1)
  assert len(S.find_shards(d / "ar")) == 1 and len(S.ArrayRecordLlavaSource(d / "ar")) == 2
  with pytest.raises(FileNotFoundError, match="validation"):
    S.find_shards(d / "ar", "validation")


def test_stored_image_bytes_keeps_jpeg_and_png():
  buf = io.BytesIO()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="JPEG")
  assert S.stored_image_bytes(buf.getvalue()) == buf.getvalue()
  with pytest.raises(ValueError):
    S.stored_image_bytes(b"neither an image nor a path")


def test_open_source_concatenates_files(tmp_path):
  from llava_jax.data.sources import ConcatSource, open_source
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  a.write_text('{"id": "a0", "conversations": []}\n{"id": "a1", "conversations": []}\n')
  b.write_text('{"id": "b0", "conversations": []}\n')
  src = open_source(f"{a},{b}")
  assert isinstance(src, ConcatSource) and len(src) == 3
  assert [src[i]["id"] for i in range(3)] == ["a0", "a1", "b0"] and src[-1]["id"] == "b0"
  assert open_source([str(b)])[0]["id"] == "b0"
  with pytest.raises(IndexError):
    src[3]
