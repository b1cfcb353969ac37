"""``python -m llava_jax.generate`` on 2 processes prints the 1-process answer, once; a
prompt's ``<image>`` without ``--image`` is refused before anything is loaded or compiled."""
import re

import numpy as np
import pytest

import tiny_checkpoint
from multiprocess import run_module
from llava_jax.data.images import load_image, preprocess
from llava_jax.infer.loading import load_model
from llava_jax.infer.sampler import generate

QUESTION, FOLLOW_UP = "What color is the square?", "How many circles are there?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return tiny_checkpoint.write_tiny_llava(str(tmp_path_factory.mktemp("tiny_mp")))


def _answers(paths, max_new: int) -> list[str]:
  """The two greedy answers of the conversation, in this (single) process, no mesh."""
  model = load_model(paths["model"])
  px = preprocess(load_image(paths["image"]), model.image_config)[None]

  def answer(conversation):
    _, ids = model.encode_prompt(conversation)
    out = generate(model.cfg, model.params, ids[None], px, max_new_tokens=max_new,
                   stop_token_ids=model.stop_token_ids())
    return model.decode_answer(np.asarray(out)[0])

  conversation = [{"from": "human", "value": f"<image>\n{QUESTION}"}]
  first = answer(conversation)
  return [first, answer(conversation + [{"from": "gpt", "value": first},
                                        {"from": "human", "value": FOLLOW_UP}])]


def _without_gloo(text: str) -> str:
  # The gloo CPU collectives log their connections on stdout, even mid-line.
  return re.sub(r"\[Gloo\][^\n]*\n", "", text)


@pytest.mark.slow
def test_generate_on_two_processes_prints_the_answer_once(tiny):
  """--interactive: process 0 reads stdin and broadcasts the line; both turns match."""
  outs = run_module("llava_jax.generate", f"--checkpoint={tiny['model']}",
                    f"--image={tiny['image']}", "--interactive", f"--prompt={QUESTION}",
                    "--max_new_tokens=6", num_processes=2, devices_per_process=2,
                    stdin=f"{FOLLOW_UP}\n\n")
  first, second = _answers(tiny, 6)
  assert first and second
  # stdin is not a tty, so the typed line is not echoed after "USER: ".
  assert _without_gloo(outs[0].stdout) == (f"USER: {QUESTION}\nASSISTANT: {first}\n"
                                           f"USER: ASSISTANT: {second}\nUSER: ")
  assert _without_gloo(outs[1].stdout) == ""


def test_image_tag_without_image_is_a_usage_error(tmp_path):
  """Refused before the checkpoint is even read (it does not exist here)."""
  outs = run_module("llava_jax.generate", f"--checkpoint={tmp_path / 'none'}",
                    "--prompt=<image>\nWhat is it?", num_processes=1, devices_per_process=1,
                    check=False, timeout=120)
  assert outs[0].returncode == 1
  assert "--prompt contains <image> but no --image was given" in outs[0].stderr


def test_placeholder_mismatch_raises_before_compiling(tiny):
  model = load_model(tiny["model"])
  _, ids = model.encode_prompt([{"from": "human", "value": "<image>\nWhat is it?"}])
  with pytest.raises(ValueError, match="placeholder/feature count mismatch"):
    generate(model.cfg, model.params, ids[None], None, max_new_tokens=2)
