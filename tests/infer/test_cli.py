"""``python -m llava_jax.generate`` on a tiny HF LLaVA directory streams the greedy answer."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tiny_checkpoint
from llava_jax.data.images import load_image, preprocess
from llava_jax.infer.loading import load_model
from llava_jax.infer.sampler import generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return tiny_checkpoint.write_tiny_llava(str(tmp_path_factory.mktemp("tiny_cli")))


def _cli(*args, stdin=None, ok=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
      [sys.executable, "-m", "llava_jax.generate", *args],
      input=stdin,
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      timeout=300,
  )
  if not ok:
    return proc
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _expected(paths, conversation, max_new, images=None, template=None):
  model = load_model(paths["model"], template=template)
  px = np.stack([preprocess(load_image(p), model.image_config) for p in images or [paths["image"]]])
  _, ids = model.encode_prompt(conversation)
  out = generate(model.cfg, model.params, ids[None], px, max_new_tokens=max_new, stop_token_ids=model.stop_token_ids())
  return model.decode_answer(np.asarray(out)[0])


def test_generate_cli_prints_the_greedy_answer(tiny):
  out = _cli(
      f"--checkpoint={tiny['model']}",
      f"--image={tiny['image']}",
      "--prompt=What color is the square?",
      "--max_new_tokens=6",
  )
  want = _expected(tiny, [{"from": "human", "value": "<image>\nWhat color is the square?"}], 6)
  assert want and out.strip() == want


def test_generate_cli_interactive_keeps_the_conversation(tiny):
  out = _cli(
      f"--checkpoint={tiny['model']}",
      f"--image={tiny['image']}",
      "--interactive",
      "--prompt=What color is the square?",
      "--max_new_tokens=4",
      stdin="How many circles are there?\n\n",
  )
  # stdin is not a tty, so the typed line's newline is not echoed after "USER: ".
  answers = [part.split("\n")[0].strip() for part in out.split("ASSISTANT: ")[1:]]
  assert len(answers) == 2, out
  first = _expected(tiny, [{"from": "human", "value": "<image>\nWhat color is the square?"}], 4)
  second = _expected(
      tiny,
      [
          {"from": "human", "value": "<image>\nWhat color is the square?"},
          {"from": "gpt", "value": first},
          {"from": "human", "value": "How many circles are there?"},
      ],
      4,
  )
  assert answers == [first, second]


def test_load_model_from_a_training_workdir(tiny, tmp_path):
  """DIR/run.json -> orbax ``load_run``: same model, tokenizer and answers as the HF dir."""
  import orbax.checkpoint as ocp

  from llava_jax.checkpoint.orbax import write_run_info

  hf = load_model(tiny["model"])
  write_run_info(
      str(tmp_path),
      model=hf.cfg,
      tokenizer=os.path.join(tiny["model"], "tokenizer.model"),
      template="llava_v1",
      image=hf.image_config,
  )
  with ocp.CheckpointManager(str(tmp_path / "checkpoints")) as manager:
    manager.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(hf.params)))
    manager.wait_until_finished()
  run = load_model(str(tmp_path), template="vicuna_v1")
  assert (run.source, run.step, run.template) == ("run", 7, "vicuna_v1")
  assert run.cfg == hf.cfg and run.image_config == hf.image_config
  conversation = [{"from": "human", "value": "<image>\nIs there a red triangle?"}]
  px = preprocess(load_image(tiny["image"]), hf.image_config)[None]
  _, ids = hf.encode_prompt(conversation)  # same ids for both (their templates differ)
  assert run.encode_prompt(conversation)[1].tolist() != ids.tolist()
  outs = []
  for m in (hf, run):
    outs.append(np.asarray(generate(m.cfg, m.params, ids[None], px, max_new_tokens=5)))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_load_model_errors_say_what_was_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither run.json .* nor config.json"):
    load_model(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match="unknown conversation template 'nope'"):
    load_model(str(tmp_path), template="nope")


def test_generate_cli_answers_about_two_images(tiny, tmp_path):
  """Two --image files, one <image> tag each: the images' features go where the template
  puts the tags (LLaVA-1.5's: both first; "@inline": in the text), in the files' order."""
  from PIL import Image

  second = str(tmp_path / "mirrored.png")
  Image.open(tiny["image"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
  images = [tiny["image"], second]
  prompt = "Is the square in <image> where it is in <image>?"
  inline = load_model(tiny["model"]).template + "@inline"
  for template in (None, inline):
    args = [f"--checkpoint={tiny['model']}", *(f"--image={p}" for p in images), f"--prompt={prompt}"]
    out = _cli(*args, "--max_new_tokens=5", *([f"--template={template}"] if template else []))
    want = _expected(tiny, [{"from": "human", "value": prompt}], 5, images=images, template=template)
    assert want and out.strip() == want, template
  untagged = _cli(
      f"--checkpoint={tiny['model']}", *(f"--image={p}" for p in images), "--prompt=Same?", "--max_new_tokens=5"
  )
  want = _expected(tiny, [{"from": "human", "value": "<image>\n<image>\nSame?"}], 5, images=images)
  assert untagged.strip() == want


def test_generate_cli_refuses_tags_that_do_not_match_the_images(tiny):
  proc = _cli(
      f"--checkpoint={tiny['model']}",
      f"--image={tiny['image']}",
      f"--image={tiny['image']}",
      "--prompt=What is in <image>?",
      ok=False,
  )
  assert proc.returncode != 0 and "1 <image> tag(s) but 2 --image file(s)" in proc.stderr
