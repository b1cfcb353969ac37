"""The images of a record: one rule (`records.image_list`) for the sources, the tokenizer, the
pipeline and the array_record converter; a record with both "image" and "images" is a
bad_record everywhere, never read one way here and another way there."""

import json

import pytest

from llava_jax.data import array_record as AR
from llava_jax.data import pipeline as P
from llava_jax.data import sources as S
from llava_jax.data import synthetic as sy
from llava_jax.data.images import image_config_for
from llava_jax.data.records import RecordError, image_list, sample_id_of
from llava_jax.data.tokenize import Rejected, RejectReason, tokenize_conversation
from llava_jax.tokenizer import load_tokenizer

CONV = [{"from": "human", "value": "<image>\nIs there a square?"}, {"from": "gpt", "value": "yes"}]


@pytest.mark.parametrize(
    "record, want",
    [
        ({"image": "a.jpg"}, ["a.jpg"]),  # LLaVA: one path
        ({"image": ["a.jpg", "b.jpg"]}, ["a.jpg", "b.jpg"]),  # LLaVA: several
        ({"images": ["a.jpg"]}, ["a.jpg"]),  # normalised records
        ({"images": ("a.jpg", b"\x89PNG")}, ["a.jpg", b"\x89PNG"]),
        ({"images": "a.jpg"}, ["a.jpg"]),
        ({"images": []}, []),
        ({}, []),
        ({"image": None, "images": ["b.jpg"]}, ["b.jpg"]),  # None counts as absent
        ({"image": "a.jpg", "images": None}, ["a.jpg"]),
    ],
)
def test_image_list(record, want):
  assert image_list(record) == want


@pytest.mark.parametrize(
    "record", [{"id": "both", "image": "a.jpg", "images": ["a.jpg"]}, {"id": "both", "image": "a.jpg", "images": []}]
)
def test_both_keys_is_an_error_naming_the_record(record):
  with pytest.raises(RecordError, match=r"record 'both' has both 'image' \(1 image\) and 'images'"):
    image_list(record)
  assert issubclass(RecordError, ValueError)


def test_sample_id_of():
  assert sample_id_of({"id": 17}) == "17"
  assert sample_id_of({"sample_id": "s"}) == "s"
  assert sample_id_of({}) == "<no id>"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes")
  paths = sy.write_synthetic(d, seed=0, n_train=8, n_val=4, image_size=28, array_record=False)
  return paths, load_tokenizer(paths["tokenizer"])


def _both(paths):
  with open(paths["stage2"]) as f:
    good = json.loads(f.readline())
  return good, {**good, "id": "both", "images": [good["image"]]}


def test_json_source_reads_both_keys_as_a_bad_record(data, tmp_path):
  paths, _ = data
  good, both = _both(paths)
  path = tmp_path / "both.jsonl"
  path.write_text(json.dumps(good) + "\n" + json.dumps(both) + "\n")
  src = S.LlavaJsonSource(path, image_root=paths["images"])
  assert src[0]["images"] and "error" not in src[0]
  assert src[1]["id"] == "both" and src[1]["images"] == []
  assert "both.jsonl: record 1" in src[1]["error"] and "both 'image'" in src[1]["error"]


def test_tokenizer_and_pipeline_reject_both_keys_as_bad_record(data):
  paths, tok = data
  good, both = _both(paths)
  image_token_id = tok.token_to_id(sy.IMAGE_TOKEN)
  got = tokenize_conversation(both, tok, "llava_v1", image_token_id=image_token_id, num_image_tokens=4, max_len=160)
  assert isinstance(got, Rejected) and got.reason == RejectReason.BAD_RECORD and "both" in got.detail
  normalised = S.normalize_record(good, paths["images"])
  source = [normalised, {**normalised, "id": "both", "image": "x.png"}, {**normalised, "id": "none", "image": None}]
  example = P.ExampleSpec(
      tokenizer=tok,
      template="llava_v1",
      image_config=image_config_for("clip", 28),
      image_token_id=image_token_id,
      num_image_tokens=4,
      max_len=160,
      max_images=1,
  )
  it = P.make_dataset(
      source,
      P.PipelineConfig(
          example,
          batch_size=3,
          seed=0,
          shuffle=False,
          num_epochs=1,
          drop_remainder=False,
          process_index=0,
          process_count=1,
      ),
  )
  ids = [i for b in it for i in b["ids"]]
  assert it.counts()["bad_record"] == 1
  assert [i for i in ids if i] == [good["id"], "none"]  # "image": None is no image key


def test_converter_skips_or_raises_on_both_keys(data, tmp_path):
  paths, _ = data
  good, both = _both(paths)
  report = AR.write_array_record([good, both], tmp_path / "ar", image_root=paths["images"])
  assert report.written == 1 and report.skipped == {"bad_record": 1}
  assert report.skipped_ids == [("both", "bad_record")]
  with pytest.raises(ValueError, match=r"id 'both'.*\(bad_record\).*both 'image'"):
    AR.write_array_record([good, both], tmp_path / "ar2", image_root=paths["images"], policy="raise")
