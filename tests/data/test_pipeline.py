"""The grain pipeline: batch shapes and masks, rejection policies and counts, host sharding, exact resume."""

import dataclasses
import json
import os
from dataclasses import replace

import numpy as np
import pytest

from llava_jax.data import grain_stages
from llava_jax.data import pipeline as P
from llava_jax.data import synthetic as sy
from llava_jax.data.images import image_config_for
from llava_jax.data.sources import ArrayRecordLlavaSource, LlavaJsonSource
from llava_jax.data.tokenize import IGNORE, RejectReason
from llava_jax.tokenizer import load_tokenizer

N_IMG = 4
MAX_LEN = 128
SIZE = 14  # preprocess 28 px images down to 14: small batches, same code path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes")
  paths = sy.write_synthetic(d, seed=0, n_train=48, n_val=8, image_size=28)
  tok = load_tokenizer(paths["tokenizer"])
  return paths, tok


def _kw(tok, **over):
  kw = dict(
      tokenizer=tok,
      template="llava_v1",
      image_config=image_config_for("clip", SIZE),
      image_token_id=tok.token_to_id(sy.IMAGE_TOKEN),
      num_image_tokens=N_IMG,
      max_len=MAX_LEN,
      max_images=2,
      batch_size=4,
      seed=0,
      process_index=0,
      process_count=1,
  )
  kw.update(over)
  return kw


def _config(tok, **over) -> P.PipelineConfig:
  """`_kw` as a PipelineConfig: the example's fields go to its ExampleSpec."""
  kw = _kw(tok, **over)
  example = {f.name: kw.pop(f.name) for f in dataclasses.fields(P.ExampleSpec) if f.name in kw}
  return P.PipelineConfig(P.ExampleSpec(**example), **kw)


def _records(paths, key="stage2"):
  src = LlavaJsonSource(paths[key], image_root=paths["images"])
  return [src[i] for i in range(len(src))]


def _runs(labels):
  """Contiguous stretches of learned positions: [(start, end), ...]."""
  on = np.concatenate([[False], labels != IGNORE, [False]])
  edges = np.flatnonzero(on[1:] != on[:-1])
  return list(zip(edges[::2], edges[1::2]))


def test_batch_shapes_dtypes_and_masks(data):
  paths, tok = data
  records = {r["id"]: r for r in _records(paths)}
  text_only = {
      "id": "text-only",
      "images": [],
      "conversations": [{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}],
  }
  src = list(records.values())[:7] + [text_only]
  records["text-only"] = text_only
  it = P.make_dataset(src, _config(tok, shuffle=False, num_epochs=1))
  batches = list(it)
  assert len(batches) == 2
  image_id = tok.token_to_id(sy.IMAGE_TOKEN)
  for b in batches:
    assert set(b) == set(P.BATCH_KEYS)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (4, MAX_LEN)
    assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == np.int32
    assert b["pixel_values"].shape == (4, 2, SIZE, SIZE, 3) and b["pixel_values"].dtype == np.float32
    assert b["image_mask"].shape == (4, 2) and b["image_mask"].dtype == bool
    assert b["ids"].shape == (4,) and b["ids"].dtype == object
    for row in range(4):
      ids, labels, mask = b["input_ids"][row], b["labels"][row], b["attention_mask"][row]
      rec = records[b["ids"][row]]
      n = int(mask.sum())
      assert mask[:n].all() and not mask[n:].any()  # right padding
      assert (ids[n:] == tok.pad_id).all() and (labels[n:] == IGNORE).all()
      learned = labels != IGNORE
      np.testing.assert_array_equal(labels[learned], ids[learned])
      # Learned tokens are exactly each answer with its "</s>".
      answers = [t["value"] for t in rec["conversations"][1::2]]
      got = [tok.decode(ids[s:e], skip_special_tokens=False) for s, e in _runs(labels)]
      assert got == [a + "</s>" for a in answers]
      n_images = len(rec["images"])
      assert (ids == image_id).sum() == n_images * N_IMG and not learned[ids == image_id].any()
      assert b["image_mask"][row].tolist() == [k < n_images for k in range(2)]
      assert not b["pixel_values"][row, n_images:].any()
      if n_images:
        assert b["pixel_values"][row, 0].std() > 0.1  # a real picture, normalized
  assert it.counts() == {r.value: 0 for r in RejectReason}


def test_json_and_array_record_sources_give_identical_batches(data):
  paths, tok = data
  a = P.make_dataset(LlavaJsonSource(paths["stage2"], image_root=paths["images"]), _config(tok))
  b = P.make_dataset(ArrayRecordLlavaSource(paths["array_record_stage2"], "train"), _config(tok))
  for _ in range(3):
    x, y = next(a), next(b)
    for k in P.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_plain_template_on_stage1(data):
  paths, tok = data
  it = P.make_dataset(
      LlavaJsonSource(paths["stage1"], image_root=paths["images"]), _config(tok, template="plain", max_images=1)
  )
  b = next(it)
  for row in range(4):
    ((s, e),) = _runs(b["labels"][row])
    assert tok.decode(b["input_ids"][row, s:e]).endswith(".\n")  # the caption
    assert s == 1 + N_IMG  # <s>, the image, then the caption


def _bad_inputs(paths, tmp):
  """One record per rejection reason (id = reason), plus the good records."""
  good = _records(paths)[:6]
  corrupt = os.path.join(tmp, "corrupt.png")
  with open(corrupt, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n but then garbage")
  q = lambda text: {"from": "human", "value": text}
  a = lambda text: {"from": "gpt", "value": text}
  img = good[0]["images"][0]
  long_question = " ".join(["What color is the square?"] * 30)
  bad = [
      {"id": "bad_image", "images": [corrupt], "conversations": [q("<image>\nIs there a square?"), a("yes")]},
      {
          "id": "missing_image",
          "images": [os.path.join(tmp, "nothere.png")],
          "conversations": [q("<image>\nIs there a square?"), a("yes")],
      },
      {"id": "none_image", "images": [None], "conversations": [q("<image>\nIs there a square?"), a("yes")]},
      {
          "id": "too_many_images",
          "images": [img, img, img],
          "conversations": [q("<image>\n<image>\n<image>\nsame?"), a("yes")],
      },
      {"id": "tag_without_image", "images": [], "conversations": [q("<image>\nIs there a square?"), a("no")]},
      {"id": "template_mismatch", "images": [img], "conversations": [q("<image>\nhi"), q("again"), a("yes")]},
      {"id": "truncated_no_target", "images": [img], "conversations": [q("<image>\n" + long_question), a("red")]},
      {"id": "no_target", "images": [img], "conversations": [q("<image>\nIs there a square?")]},
  ]
  return good, bad


def test_each_bad_input_is_counted_under_its_reason_and_skipped(data, tmp_path, caplog):
  paths, tok = data
  good, bad = _bad_inputs(paths, tmp_path)
  src = [x for k in range(len(bad)) for x in (good[k : k + 1] + [bad[k]])]
  it = P.make_dataset(src, _config(tok, shuffle=False, num_epochs=1, drop_remainder=False))
  ids = [i for b in it for i in b["ids"]]
  assert [i for i in ids if i] == [g["id"] for g in good]
  assert ids[len(good) :] == [""] * (-len(good) % 4)  # the last batch is padded with empty rows
  assert it.counts() == {
      "bad_image": 3,
      "image_count_mismatch": 2,
      "template_mismatch": 1,
      "truncated_no_target": 1,
      "no_target": 1,
      "truncated_image": 0,
      "bad_record": 0,
      "empty_answer": 0,
      "image_over_budget": 0,
      "bad_video": 0,
  }
  for r in bad:
    assert f"'{r['id']}'" in caplog.text  # every rejection logged with its id
  assert "more than the max_images=2" in caplog.text and "nothere.png" in caplog.text


def test_truncated_image_reason(data):
  paths, tok = data
  rec = dict(_records(paths)[0])
  rec["conversations"] = [
      {"from": "human", "value": "Is there a square?"},
      {"from": "gpt", "value": "yes"},
      {"from": "human", "value": "<image>\nWhere is the square?"},
      {"from": "gpt", "value": "top"},
  ]
  prepare = lambda max_len: P.prepare_example(rec, _config(tok, max_len=max_len).example)
  full = prepare(MAX_LEN)
  first_image = int(np.argmax(full["input_ids"] == tok.token_to_id(sy.IMAGE_TOKEN)))
  out = prepare(first_image + N_IMG - 1)  # the first answer fits, the image does not
  assert out.reason == RejectReason.TRUNCATED_IMAGE and out.sample_id == rec["id"], out


@pytest.mark.parametrize(
    "which", ["bad_image", "missing_image", "none_image", "too_many_images", "template_mismatch", "truncated_no_target"]
)
def test_raise_policy_names_the_sample(data, tmp_path, which):
  paths, tok = data
  good, bad = _bad_inputs(paths, tmp_path)
  src = good[:2] + [r for r in bad if r["id"] == which]
  it = P.make_dataset(src, _config(tok, shuffle=False, num_epochs=1, policy="raise", batch_size=2))
  next(it)
  with pytest.raises(ValueError, match=f"sample '{which}' rejected"):
    next(it)


def test_all_rejected_forever_raises_instead_of_spinning(data, tmp_path, monkeypatch):
  paths, tok = data
  _, bad = _bad_inputs(paths, tmp_path)
  monkeypatch.setattr(grain_stages, "MAX_CONSECUTIVE_REJECTS", 50)  # where the counting stage reads it
  it = P.make_dataset(bad[4:6], _config(tok, num_epochs=None))
  with pytest.raises(RuntimeError, match="50 samples in a row rejected"):
    next(it)


def test_processes_read_their_rows_of_each_global_batch(data):
  """Global batch k holds the same examples in the same rows for 1, 2 or 4 processes."""
  paths, tok = data
  records = _records(paths)[:43]
  kw = _config(tok, batch_size=4, seed=3, num_epochs=None)
  one = P.make_dataset(records, kw)
  want = [next(one)["ids"].tolist() for _ in range(15)]  # crosses the end of an epoch
  for n in (2, 4):
    its = [P.make_dataset(records, replace(kw, process_index=p, process_count=n)) for p in range(n)]
    got = [[i for it in its for i in next(it)["ids"].tolist()] for _ in range(15)]
    assert got == want, n
  # Resuming on another process count at a global batch boundary continues the same order.
  half = [P.make_dataset(records, replace(kw, process_index=p, process_count=2)) for p in range(2)]
  for _ in range(6):
    for it in half:
      next(it)
  start = P.resume_batch([it.get_state() for it in half])
  assert start == 6
  resumed = P.make_dataset(records, replace(kw, start_batch=start))
  assert [next(resumed)["ids"].tolist() for _ in range(9)] == want[6:]
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    P.make_dataset(records, replace(kw, batch_size=6, process_index=0, process_count=4))


def test_finite_pass_over_processes_keeps_every_slot(data, tmp_path):
  """Evaluation over several processes: each yields the same number of batches, rejected
  samples and the end of the data are empty rows, and together they cover every record once."""
  paths, tok = data
  good, bad = _bad_inputs(paths, tmp_path)
  records = _records(paths)[:9] + bad[:1]  # 10 records, one rejected
  kw = _config(tok, batch_size=4, shuffle=False, num_epochs=1, drop_remainder=False)
  per = [
      [b["ids"].tolist() for b in P.make_dataset(records, replace(kw, process_index=p, process_count=2))]
      for p in range(2)
  ]
  assert [len(b) for b in per] == [3, 3]  # ceil(10 / 4) global batches on each
  rows = [i for k in range(3) for p in range(2) for i in per[p][k]]
  assert rows == [r["id"] for r in records[:9]] + [""] * 3  # the bad record's slot and the tail
  with pytest.raises(ValueError, match="holds no records"):
    P.make_dataset([], kw)


def test_shuffle_is_seeded_and_epochs_reshuffle(data):
  paths, tok = data
  records = _records(paths)[:16]
  order = lambda seed: [i for b in P.make_dataset(records, _config(tok, seed=seed, num_epochs=2)) for i in b["ids"]]
  a = order(0)
  assert a == order(0) and a != order(1)
  assert sorted(a[:16]) == sorted(a[16:]) == sorted(r["id"] for r in records) and a[:16] != a[16:]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in P.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_state_restore_continues_with_the_same_batches(data, tmp_path):
  paths, tok = data
  good, bad = _bad_inputs(paths, tmp_path)
  src = good + _records(paths)[6:30] + bad[:2]  # 32 records, 2 rejected per epoch: epochs end mid-batch
  kw = _config(tok, seed=5, num_epochs=None)
  it = P.make_dataset(src, kw)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  counts = it.counts()
  want = _take(it, 12)  # crosses epoch boundaries
  assert it.counts()["bad_image"] > counts["bad_image"]
  resumed = P.make_dataset(src, kw)
  resumed.set_state(state)
  assert resumed.counts() == counts
  _assert_same(_take(resumed, 12), want)
  assert resumed.counts() == it.counts()


def test_orbax_checkpoint_of_the_iterator(data, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  paths, tok = data
  src = LlavaJsonSource(paths["stage2"], image_root=paths["images"])
  it = P.make_dataset(src, _config(tok, seed=2))
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 4)
    resumed = P.make_dataset(src, _config(tok, seed=2))
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same(_take(resumed, 4), want)


def test_workers_give_the_same_batches_counts_and_state(data, tmp_path):
  paths, tok = data
  good, bad = _bad_inputs(paths, tmp_path)
  src = good + _records(paths)[6:30] + bad[:2]
  kw = _config(tok, seed=1, num_epochs=None)
  ref = P.make_dataset(src, kw)
  want = _take(ref, 12)
  it = P.make_dataset(src, replace(kw, worker_count=2))
  try:
    _assert_same(_take(it, 6), want[:6])
    state = it.get_state()
    _assert_same(_take(it, 6), want[6:])
    # Rejections made in the worker processes are counted here, as without workers.
    assert it.counts() == ref.counts() and it.counts()["bad_image"] >= 2
  finally:
    it.close()
  resumed = P.make_dataset(src, replace(kw, worker_count=2))
  try:
    resumed.set_state(state)
    _assert_same(_take(resumed, 6), want[6:])
  finally:
    resumed.close()


# ----------------------------------------------------------------------------- packing


def _segments(batch):
  """Packed batch -> {sample id: (input_ids, labels, pixel_values[I])} per example."""
  out = {}
  for r in range(len(batch["input_ids"])):
    seg, pos = batch["attention_mask"][r], batch["positions"][r]
    ids = batch["ids"][r].split(",") if batch["ids"][r] else []
    assert sorted(set(seg[seg > 0])) == list(range(1, len(ids) + 1))  # ids 1..k in row order
    slot = 0
    for k, sid in enumerate(ids, start=1):
      at = np.flatnonzero(seg == k)
      assert np.array_equal(at, np.arange(at[0], at[-1] + 1))  # contiguous
      np.testing.assert_array_equal(pos[at], np.arange(len(at)))  # positions restart
      tokens = batch["input_ids"][r, at]
      n_img = int(np.sum(tokens == batch["image_token_id"])) // N_IMG
      out[sid] = (tokens, batch["labels"][r, at], batch["pixel_values"][r, slot : slot + n_img])
      slot += n_img
    assert batch["image_mask"][r].sum() == slot and not batch["image_mask"][r, slot:].any()
    assert (batch["labels"][r, seg == 0] == IGNORE).all() and (batch["positions"][r, seg == 0] == 0).all()
  return out


def test_packing_keeps_every_example_whole_and_once(data, tmp_path):
  paths, tok = data
  good, bad = _bad_inputs(paths, tmp_path)
  text_only = {
      "id": "text-only",
      "images": [],
      "conversations": [{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}],
  }
  src = good + [text_only] + _records(paths)[6:20] + bad[:3]
  kw = _config(tok, shuffle=False, num_epochs=1, drop_remainder=False, max_len=4 * MAX_LEN, max_images=8)
  unpacked = {}
  for b in P.make_dataset(src, kw):
    for r, sid in enumerate(b["ids"]):
      if sid:
        n = int(b["attention_mask"][r].sum())
        unpacked[sid] = (b["input_ids"][r, :n], b["labels"][r, :n], b["pixel_values"][r, b["image_mask"][r]])
  it = P.make_dataset(src, replace(kw, pack=True))
  batches = list(it)
  packed = {}
  for b in batches:
    assert b["input_ids"].shape == (4, 4 * MAX_LEN) and b["pixel_values"].shape == (4, 8, SIZE, SIZE, 3)
    got = _segments({**b, "image_token_id": tok.token_to_id(sy.IMAGE_TOKEN)})
    assert not set(got) & set(packed)  # each example once
    packed.update(got)
  assert set(packed) == set(unpacked) and "text-only" in packed
  for sid, (ids, labels, px) in unpacked.items():
    for want, got in zip((ids, labels, px), packed[sid]):
      np.testing.assert_array_equal(got, want, err_msg=sid)
  rows = sum(1 for b in batches for s in b["ids"] if s)
  assert rows <= len(unpacked) / 3, (rows, len(unpacked))  # ~100-token examples, 512-token rows
  assert it.counts()["bad_image"] == 3  # rejections are still counted


def test_packed_rows_never_exceed_the_image_slots(data):
  paths, tok = data
  it = P.make_dataset(
      _records(paths), _config(tok, shuffle=False, num_epochs=1, max_images=1, max_len=4 * MAX_LEN, pack=True)
  )
  b = next(it)
  assert b["image_mask"].shape == (4, 1) and b["image_mask"].all()
  assert (b["attention_mask"].max(axis=1) == 1).all()  # one image slot: one example per row


def test_packed_state_restore_continues_with_the_same_batches(data, tmp_path):
  paths, tok = data
  good, bad = _bad_inputs(paths, tmp_path)
  src = good + _records(paths)[6:30] + bad[:2]
  kw = _config(tok, seed=3, num_epochs=None, pack=True, pack_bins=3)
  it = P.make_dataset(src, kw)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  want = _take(it, 8)  # crosses epochs and packing rounds
  resumed = P.make_dataset(src, kw)
  resumed.set_state(state)
  _assert_same(_take(resumed, 8), want)
  assert resumed.counts() == it.counts()
