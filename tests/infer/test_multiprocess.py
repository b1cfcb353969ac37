"""``python -m llava_jax.generate`` on 2 processes prints the 1-process answer, once; a
prompt's ``<image>`` without ``--image`` is refused before anything is loaded or compiled."""

import numpy as np
import pytest

import tiny_checkpoint
from multiprocess import run_module
from llava_jax.data.images import load_image, preprocess
from llava_jax.infer.loading import load_model
from llava_jax.infer.sampler import generate

QUESTION = "What color is the square?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return tiny_checkpoint.write_tiny_llava(str(tmp_path_factory.mktemp("tiny_mp")))


def _answer(paths, max_new: int) -> str:
  """The greedy answer to QUESTION about the image, in this (single) process, no mesh."""
  model = load_model(paths["model"])
  px = preprocess(load_image(paths["image"]), model.image_config)[None]
  _, ids = model.encode_prompt([{"from": "human", "value": f"<image>\n{QUESTION}"}])
  out = generate(model.cfg, model.params, ids[None], px, max_new_tokens=max_new, stop_token_ids=model.stop_token_ids())
  return model.decode_answer(np.asarray(out)[0])


@pytest.mark.slow
def test_generate_on_two_processes_prints_the_answer_once(tiny):
  """--interactive: process 0 reads the question on stdin and broadcasts it; the others'
  stdin is empty, so they answer only what process 0 read, and stop with it."""
  outs = run_module(
      "llava_jax.generate",
      f"--checkpoint={tiny['model']}",
      f"--image={tiny['image']}",
      "--interactive",
      "--max_new_tokens=6",
      num_processes=2,
      devices_per_process=2,
      stdin=f"{QUESTION}\n\n",
  )
  want = _answer(tiny, 6)
  assert want
  # stdin is not a tty, so the typed line is not echoed after "USER: ". Nothing else is on
  # stdout: gloo's connection log (C++, on fd 1) is sent to stderr.
  assert outs[0].stdout == f"USER: ASSISTANT: {want}\nUSER: "
  assert outs[1].stdout == ""
  assert "[Gloo]" in outs[0].stderr


def test_image_tag_without_image_is_a_usage_error(tmp_path):
  """Refused before the checkpoint is even read (it does not exist here)."""
  outs = run_module(
      "llava_jax.generate",
      f"--checkpoint={tmp_path / 'none'}",
      "--prompt=<image>\nWhat is it?",
      num_processes=1,
      devices_per_process=1,
      check=False,
      timeout=120,
  )
  assert outs[0].returncode == 1
  assert "--prompt has 1 <image> tag(s) but 0 --image file(s) were given" in outs[0].stderr


def test_placeholder_mismatch_raises_before_compiling(tiny):
  model = load_model(tiny["model"])
  _, ids = model.encode_prompt([{"from": "human", "value": "<image>\nWhat is it?"}])
  with pytest.raises(ValueError, match="placeholder/feature count mismatch"):
    generate(model.cfg, model.params, ids[None], None, max_new_tokens=2)
