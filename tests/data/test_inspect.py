"""python -m llava_jax.data.inspect: samples as the model sees them, learned tokens marked, rejections, lengths."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llava_jax import tokenizer as tk
from llava_jax.data import inspect as ins
from llava_jax.data.tokenize import tokenize_conversation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MISTRAL = os.path.join(ROOT, "tests", "data", "testdata", "mistral_v1_tokenizer.model")


def _config(root, **data):
  spec = importlib.util.spec_from_file_location("tiny_shapes", os.path.join(ROOT, "configs", "tiny_shapes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"test,root={root}")
  config.data.update(data)
  return config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("shapes"))


def test_pieces_show_what_the_model_reads():
  """Dummy-prefix spaces show, so legacy is visible; images are one placeholder; learned text is marked."""
  sample = {
      "id": "s",
      "image": "x.jpg",
      "conversations": [
          {"from": "human", "value": "<image>\nHi"},
          {"from": "gpt", "value": "A cat."},
          {"from": "human", "value": "Color?"},
          {"from": "gpt", "value": "Black."},
      ],
  }
  out = {}
  for legacy in (True, False):
    tok = tk.SentencePieceTokenizer.from_file(MISTRAL, legacy=legacy)
    r = tokenize_conversation(sample, tok, "vicuna_v1", image_token_id=32000, num_image_tokens=576, max_len=2048)
    out[legacy] = ins.highlight(ins.token_pieces(r.input_ids, r.labels, tok, 32000), color=False)
  tail = " ASSISTANT:[[ A cat.</s>]]{}USER: Color? ASSISTANT:[[ Black.</s>]]"
  assert out[True].endswith(tail.format(" ")) and out[False].endswith(tail.format(""))
  assert out[True].startswith("<s> A chat between a curious user") and "USER: <image x576> \nHi" in out[True]
  colored = ins.highlight([("a", False), ("b\nc", True)], color=True)
  assert colored == "a\x1b[30;42mb\x1b[0m\n\x1b[30;42mc\x1b[0m"


def test_first_fit_rows():
  assert ins.first_fit_rows([6, 5, 4, 3, 2], 10) == 2  # [6, 4] [5, 3, 2]
  assert ins.first_fit_rows([11, 10, 10], 10) == 2  # the 11 does not fit any row


def test_report_on_the_embedded_data_and_rejections(root, tmp_path):
  report = ins.inspect_config(_config(root), index=1, show=2, count=0)
  lines = report.splitlines()
  assert lines[0].startswith("data.train: 64 records; template 'vicuna_v1'; tokenizer ")
  assert "(sentencepiece)" in lines[0]
  assert "sample 'shapes-train-000001-qa' (record 1): " in report
  assert "sample 'shapes-train-000002-qa' (record 2)" in report
  assert "USER: <image x9> \n" in report and "ASSISTANT:[[ yes</s>]]" in report
  assert "first 64 samples: 64 trained on, 0 rejected" in report
  assert "max_len 128: 0 samples (0.0%) longer" in report and "first-fit packing" in report
  # a file with one sample of each kind of trouble
  good = json.loads(open(os.path.join(root, "data", "stage2.jsonl")).readline())
  rows = [
      good,
      {**good, "id": "empty", "conversations": good["conversations"][:1] + [{"from": "gpt", "value": " "}]},
      {**good, "id": "noimage", "image": None},
      {
          **good,
          "id": "long",
          "conversations": good["conversations"]
          + [{**turn, "value": turn["value"].replace("<image>\n", "")} for turn in good["conversations"]] * 2,
      },
  ]
  path = tmp_path / "mixed.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
  report = ins.inspect_config(_config(root, train=str(path), max_len=200), index=1, count=0)
  assert "sample 'empty' (record 1) rejected (empty_answer): turn 1 (assistant) is whitespace only" in report
  assert "first 5 samples: 2 trained on, 3 rejected" in report
  for reason in ("empty_answer", "image_count_mismatch", "bad_record"):
    assert f"  {reason}" in report, report
  assert "e.g. 'noimage': 1 <image> tags in the rendered text, 0 images given" in report
  assert "max_len 200: 1 samples (50.0%) longer" in report  # "long" is cut (its answers remain)
  with pytest.raises(ValueError, match="--index 9 out of range: 5 records"):
    ins.inspect_config(_config(root, train=str(path)), index=9)


def test_command_line(root):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "llava_jax.data.inspect",
          f"--config=configs/tiny_shapes.py:test,root={root}",
          "--index=3",
          "--count=10",
          "--color=always",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "sample 'shapes-train-000003-qa' (record 3)" in out.stdout and "\x1b[30;42m" in out.stdout
  assert "first 10 samples: 10 trained on, 0 rejected" in out.stdout
  assert "sentencepiece back end" in out.stderr  # the back end is logged


def test_videos_and_anyres_images_are_counted_as_training_counts_them(tmp_path):
  """Configs with videos (stage 3: a clip is its frames as images; video=1: a video token's
  slot) and an anyres one: the inspector's tokens equal the training pipeline's for every
  sample, without decoding a pixel."""
  from llava_jax.data import pipeline as P
  from llava_jax.train import loop, run_config

  spec = importlib.util.spec_from_file_location("tiny_shapes", os.path.join(ROOT, "configs", "tiny_shapes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg in ("stage3", "test,video=1", "test,anyres=1"):
    config = module.get_config(f"{arg},root={tmp_path / 'data'}")
    if arg == "stage3":  # a small stage 3 (its own data is 8000 scenes)
      config.data.synthetic.update(n_train=40, n_val=4, multi=dict(n_train=12, n_val=4, replay=4))
    data = ins.open_data(config)
    example = loop._prepare_run(run_config.parse(config), str(tmp_path / arg)).example
    checked = 0
    for i in range(len(data.source)):
      record = data.source[i]
      got, want = data.tokenize(record), P.prepare_example(record, example, pad=False)
      assert isinstance(want, dict) and not isinstance(got, ins.Rejected), (arg, i, got, want)
      np.testing.assert_array_equal(got.input_ids, want["input_ids"], err_msg=f"{arg} record {i}")
      checked += "video" in record or "videos" in record or arg.endswith("anyres=1")
    assert checked > 0, arg
