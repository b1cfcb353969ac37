"""Records a source cannot read (bad UTF-8, a JSONL line cut in half, a non-object) are
counted as `bad_record` and named under policy="skip", and raise naming file and
record under policy="raise"; the rest of the file still trains."""

import dataclasses
import pytest

from llava_jax.data import pipeline as P
from llava_jax.data import synthetic as sy
from llava_jax.data.images import image_config_for
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes")
  paths = sy.write_synthetic(d, seed=0, n_train=16, n_val=4, image_size=28, array_record=False)
  return paths, load_tokenizer(paths["tokenizer"])


def _file(paths, tmp_path):
  with open(paths["stage2"], "rb") as f:
    good = f.readlines()[:6]
  path = tmp_path / "mixed.jsonl"
  with open(path, "wb") as f:
    f.writelines(
        good[:2]
        + [b'{"id": "latin1", "conversations": "caf\xe9"}\n']
        + good[2:4]
        + [b"[1, 2]\n"]
        + good[4:]
        + [b'{"id": "cut", "conversations": [{"from": "hu']
    )
  return str(path)


def _kw(tok, **over):
  kw = dict(
      tokenizer=tok,
      template="llava_v1",
      image_config=image_config_for("clip", 28),
      image_token_id=tok.token_to_id(sy.IMAGE_TOKEN),
      num_image_tokens=4,
      max_len=160,
      max_images=1,
      batch_size=3,
      seed=0,
      shuffle=False,
      num_epochs=1,
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


def test_unreadable_records_are_counted_and_skipped(data, tmp_path, caplog):
  paths, tok = data
  src = LlavaJsonSource(_file(paths, tmp_path), image_root=paths["images"])
  assert len(src) == 9
  it = P.make_dataset(src, _config(tok))
  ids = [i for b in it for i in b["ids"]]
  assert len(ids) == 6 and "" not in ids  # the six good records, in two batches
  assert it.counts()["bad_record"] == 3
  assert "mixed.jsonl:2" in caplog.text and "not valid UTF-8" in caplog.text
  assert "mixed.jsonl:5" in caplog.text and "expected an object" in caplog.text
  assert "mixed.jsonl:8" in caplog.text and "a line cut short" in caplog.text


def test_unreadable_record_raises_under_raise(data, tmp_path):
  paths, tok = data
  src = LlavaJsonSource(_file(paths, tmp_path), image_root=paths["images"])
  it = P.make_dataset(src, _config(tok, policy="raise"))
  with pytest.raises(ValueError, match=r"sample 'mixed.jsonl:2' rejected \(bad_record\).*UTF-8"):
    list(it)


def test_an_empty_file_names_itself(data, tmp_path):
  _, tok = data
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="empty.jsonl.*holds no records"):
    P.make_dataset(LlavaJsonSource(str(empty)), _config(tok))
