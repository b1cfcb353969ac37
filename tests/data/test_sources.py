"""LLaVA JSON / JSONL sources (byte-offset index, random access, pickling) and source concatenation."""

import json
import os
import pickle

import pytest

from llava_jax.data import sources as S


def test_json_and_jsonl_give_the_same_records(llava_files):
  d, recs = llava_files
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


def test_json_source_pickles_for_workers(llava_files):
  d, _ = llava_files
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
  for bad, why in (
      ('{"a": 1}', "top-level JSON array"),
      ('[{"a": 1}', "truncated"),
      ("[1] [2]", "after"),
      ("", "empty"),
  ):
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


def test_iter_records_streams_raw_records(llava_files):
  d, recs = llava_files
  assert list(S.iter_records(d / "a.jsonl")) == recs


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
