"""Generation with any-resolution HF checkpoints (LLaVA-NeXT, OneVision) through what a user
types: ``load_model`` + ``LoadedModel.answer``, ``python -m llava_jax.generate`` and the
evaluator, each token-identical to HF ``generate`` on the same prompt ids.

The tiny models are ``tests/models/test_llava_next.py``'s (imported, not copied), saved
with ``save_pretrained`` next to their image processor's ``preprocessor_config.json``
and a tiny sentencepiece tokenizer. HF is given our prompt ids with the pixels and sizes
of its own image processor: a HF tokenizer converted from sentencepiece encodes the
text around ``<image>`` differently from LLaVA's chunk-wise ``tokenizer_image_token``
(which ours follows), so only HF's processor's placeholder count per image is compared
(with ours), and our tiles with its image processor's.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

import tiny_checkpoint
import sibling
from sibling import ROOT
import tiny_hf
from llava_jax.infer.loading import load_model
from llava_jax.infer.sampler import generate
from llava_jax.tokenizer import train_sentencepiece

llava_next = sibling.load("tests/models/test_llava_next.py")

NEW = 8
QUESTION = "What color is the square?"
WIDE, TALL = llava_next.IMAGES  # (height, width): 1x3 and 3x1 tiles (+ base)


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def hf_dir(request, tmp_path_factory):
  """(HF model, its image processor, its processor with a HF copy of our tokenizer or None,
  directory, image paths, template override)."""
  model, image_proc, _ = llava_next._hf_model(request.param)
  tiny_hf.randomize_(model, seed=23)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  image_proc.save_pretrained(path)  # preprocessor_config.json: load_model's image config
  train_sentencepiece(tiny_checkpoint._sentences(), vocab_size=110).save(str(path / "tokenizer.model"))
  hf_tok = tf.LlamaTokenizer.from_pretrained(str(path))
  # <image> at the model's image_token_id (127), after filler tokens.
  hf_tok.add_tokens([f"<unused{i}>" for i in range(127 - len(hf_tok))] + ["<image>"], special_tokens=True)
  if request.param == "llava_next":  # CLIP: one class token, dropped ("default")
    proc = tf.LlavaNextProcessor(
        image_processor=image_proc,
        tokenizer=hf_tok,
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
  else:  # LlavaOnevisionProcessor needs a video processor (torchvision, not installed):
    proc = None  # the counts are checked by HF's forward, which raises on a mismatch
  rng = np.random.default_rng(3)
  images = {}
  for name, (h, w) in (("wide", WIDE), ("tall", TALL)):
    images[name] = str(path / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[name])
  # OneVision's Qwen2 would get the chatml template, whose markers this tokenizer lacks.
  template = None if request.param == "llava_next" else "llava_v1"
  return model, image_proc, proc, str(path), images, template


def _hf_images(image_proc, images, return_tensors):
  """HF's image processor on the images of one prompt: OneVision's takes them as one
  sample (``[[a, b]]``: its multi-image mode, ``batch_num_images``), NeXT's as a list."""
  if isinstance(image_proc, tf.LlavaOnevisionImageProcessorPil):
    return image_proc([images], return_tensors=return_tensors)
  return image_proc(images, return_tensors=return_tensors)


def _hf_generate(model, loaded, ids, images, image_proc):
  """HF greedy tokens for our ``ids`` and HF-preprocessed ``images``, padded to NEW."""
  px = _hf_images(image_proc, images, "pt")
  stops = loaded.stop_token_ids()
  extra = {"batch_num_images": px["batch_num_images"]} if "batch_num_images" in px else {}
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.from_numpy(ids[None]).long(),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values=px["pixel_values"],
        image_sizes=px["image_sizes"],
        **extra,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=loaded.cfg.pad_token_id,
        eos_token_id=stops,
    )[0, len(ids) :].numpy()
  return np.pad(out, (0, NEW - len(out)), constant_values=loaded.cfg.pad_token_id)  # HF stops early


def _check_inputs_against_hf(loaded, image_proc, proc, images, pixels, sizes, ids):
  """Our tiles/sizes equal HF's image processor's; each image's placeholder run is as long
  as HF's processor (when there is one) makes it."""
  ref = _hf_images(image_proc, images, "np")
  ref_px = ref["pixel_values"].transpose(0, 1, 3, 4, 2)  # [I, P, 3, S, S] -> NHWC
  np.testing.assert_array_equal(sizes, ref["image_sizes"])
  assert pixels.shape == (len(images), loaded.cfg.tiles_per_image) + ref_px.shape[2:]
  square = llava_next.anyres.square_images(loaded.cfg, len(images))  # OneVision, several images
  for k, (h, w) in enumerate(sizes):
    n = llava_next.data_anyres.num_tiles((h, w), loaded.cfg.image_grid_pinpoints, loaded.cfg.vision.image_size)
    n = 1 if square else n
    np.testing.assert_array_equal(pixels[k, :n], ref_px[k, :n])
    assert not pixels[k, n:].any()
  if proc is None:
    return
  img = loaded.cfg.image_token_id
  edges = np.flatnonzero(np.diff(np.concatenate([[0], (ids == img).astype(int), [0]])))
  ours = (edges[1::2] - edges[::2]).tolist()  # placeholder runs, in order (tags apart in these prompts)
  hf = [int((proc(images=[x], text=["<image>"], return_tensors="np")["input_ids"] == img).sum()) for x in images]
  assert ours == hf, (ours, hf)


def test_answer_equals_hf_generate_on_wide_tall_and_both(hf_dir):
  model, image_proc, proc, path, paths, template = hf_dir
  loaded = load_model(path, template=template)
  assert loaded.cfg.anyres and loaded.image_config.mean == tuple(image_proc.image_mean)
  cases = [([paths["wide"]], f"<image>\n{QUESTION}"), ([paths["tall"]], f"<image>\n{QUESTION}")]
  cases.append(([paths["wide"], paths["tall"]], "Is the square in <image> where it is in <image>?"))
  answers, last = [], []
  for files, message in cases:
    images = [Image.open(f).convert("RGB") for f in files]
    conversation = [{"from": "human", "value": message}]
    pixels, sizes = loaded.preprocess_images(images)
    _, ids = loaded.encode_prompt(conversation, sizes)
    _check_inputs_against_hf(loaded, image_proc, proc, images, pixels, sizes, ids)
    ref = _hf_generate(model, loaded, ids, images, image_proc)
    ours = generate(
        loaded.cfg,
        loaded.params,
        ids[None],
        pixels,
        image_sizes=sizes,
        max_new_tokens=NEW,
        stop_token_ids=loaded.stop_token_ids(),
    )
    np.testing.assert_array_equal(np.asarray(ours)[0], ref)
    answer = loaded.answer(conversation, images if len(images) > 1 else images[0], max_new_tokens=NEW)
    assert answer == loaded.decode_answer(ref)
    answers.append(answer)
    px = _hf_images(image_proc, images, "pt")
    extra = {"batch_num_images": px["batch_num_images"]} if "batch_num_images" in px else {}
    with torch.no_grad():
      last.append(
          model(
              input_ids=torch.from_numpy(ids[None]).long(),
              pixel_values=px["pixel_values"],
              image_sizes=px["image_sizes"],
              **extra,
          )
          .logits[0, -1]
          .numpy()
      )
  assert all(answers), answers
  # The images matter (a random tiny model may still greedy-decode the same text for all):
  # the next-token logits differ between the cases.
  assert min(np.abs(a - b).max() for a, b in ((last[0], last[1]), (last[0], last[2]), (last[1], last[2]))) > 1e-3


def test_encode_prompt_needs_one_size_per_image_tag(hf_dir):
  *_, path, _, template = hf_dir
  loaded = load_model(path, template=template)
  conversation = [{"from": "human", "value": f"<image>\n{QUESTION}"}]
  with pytest.raises(ValueError, match=r"1 image tag\(s\) but 0 image size\(s\)"):
    loaded.encode_prompt(conversation)
  with pytest.raises(ValueError, match="an anyres config needs the images' original sizes"):
    generate(loaded.cfg, loaded.params, np.ones((1, 4), np.int32), np.zeros((1, 5, 28, 28, 3)), max_new_tokens=1)
  big = dict(loaded.__dict__, cfg=llava_next.LlavaConfig.from_dict({**loaded.cfg.to_dict(), "max_image_tokens": 20}))
  with pytest.raises(ValueError, match=r"image 1 of 1 .*more than the config's budget of 20"):
    type(loaded)(**big).encode_prompt(conversation, [WIDE])


@pytest.mark.parametrize("hf_dir", ["llava_next"], indirect=True)
def test_batched_generate_on_a_mesh_equals_hf_row_by_row(hf_dir):
  """Left-padded rows (wide, tall, both, text only) with [B, M, P, S, S, 3] tiles and
  [B, M, 2] sizes (empty slots masked), params and batch on a 2x2x2 mesh: each row's
  tokens equal HF generate on that row alone."""
  from llava_jax import sharding

  model, image_proc, _, path, paths, _ = hf_dir
  loaded = load_model(path, mesh=sharding.make_mesh((2, 2, 2)))
  wide, tall = (Image.open(paths[k]).convert("RGB") for k in ("wide", "tall"))
  rows = [([wide], f"<image>\n{QUESTION}"), ([tall], "<image>\nHow many circles are there?")]
  rows += [([wide, tall], "Is the square in <image> where it is in <image>?"), ([], "Is there a red triangle?")]
  prompts, refs = [], []
  for images, message in rows:
    pixels, sizes = loaded.preprocess_images(images)
    _, ids = loaded.encode_prompt([{"from": "human", "value": message}], sizes)
    prompts.append((ids, pixels, sizes))
    if images:
      refs.append(_hf_generate(model, loaded, ids, images, image_proc))
    else:
      with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids[None]).long(),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=loaded.cfg.pad_token_id,
            eos_token_id=loaded.stop_token_ids(),
        )[0, len(ids) :].numpy()
      refs.append(np.pad(out, (0, NEW - len(out)), constant_values=loaded.cfg.pad_token_id))
  t, p = max(len(ids) for ids, _, _ in prompts), loaded.cfg.tiles_per_image
  ids = np.zeros((len(rows), t), np.int32)
  mask = np.zeros_like(ids)
  pixels = np.zeros((len(rows), 2, p, 28, 28, 3), np.float32)
  sizes, image_mask = np.zeros((len(rows), 2, 2), np.int32), np.zeros((len(rows), 2), bool)
  for r, (row_ids, row_px, row_sizes) in enumerate(prompts):
    ids[r, t - len(row_ids) :], mask[r, t - len(row_ids) :] = row_ids, 1
    if row_px is not None:
      k = len(row_px)
      pixels[r, :k], sizes[r, :k], image_mask[r, :k] = row_px, row_sizes, True
  out = generate(
      loaded.cfg,
      loaded.params,
      ids,
      pixels,
      mask,
      image_mask=image_mask,
      image_sizes=sizes,
      max_new_tokens=NEW,
      stop_token_ids=loaded.stop_token_ids(),
      mesh=loaded.mesh,
  )
  np.testing.assert_array_equal(np.asarray(out), np.stack(refs))
  swap = [1, 0, 2, 3]  # row 0's placeholders with row 1's image: refused before compiling, naming the row
  with pytest.raises(ValueError, match=r"sample 0 of the batch has \d+ image placeholder tokens but its images"):
    generate(
        loaded.cfg,
        loaded.params,
        ids,
        pixels[swap],
        mask,
        image_mask=image_mask[swap],
        image_sizes=sizes[swap],
        max_new_tokens=1,
        mesh=loaded.mesh,
    )
  with pytest.raises(ValueError, match="has 2 rows of image slots but input_ids has 4 rows"):
    generate(loaded.cfg, loaded.params, ids, pixels[:2], mask, image_sizes=sizes[:2], max_new_tokens=1)


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
      [sys.executable, "-m", "llava_jax.generate", *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize("hf_dir", ["llava_next"], indirect=True)  # one subprocess: the NeXT checkpoint
def test_generate_cli_and_evaluator_answer_as_load_model(hf_dir, tmp_path):
  """The CLI on one wide image, the evaluator on wide / tall / both in one batch of
  [B, M, P, S, S, 3] (an empty slot in the single-image rows): LoadedModel.answer's text."""
  from llava_jax.eval.run import run_eval
  from llava_jax.eval.tasks import prompt_text

  *_, path, paths, _ = hf_dir
  loaded = load_model(path)
  wide = Image.open(paths["wide"]).convert("RGB")
  want = loaded.answer([{"from": "human", "value": f"<image>\n{QUESTION}"}], wide, max_new_tokens=NEW)
  out = _cli(f"--checkpoint={path}", f"--image={paths['wide']}", f"--prompt={QUESTION}", f"--max_new_tokens={NEW}")
  assert want and out.strip() == want

  rows = [
      {"question_id": "w", "image": "wide.png", "text": QUESTION},
      {"question_id": "t", "image": "tall.png", "text": QUESTION},
      {
          "question_id": "wt",
          "image": ["wide.png", "tall.png"],
          "text": "Is the square in <image> where it is in <image>?",
      },
  ]
  questions = tmp_path / "questions.jsonl"
  questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  run_eval(
      loaded,
      tmp_path / "out",
      task="synthetic",
      questions=questions,
      image_root=path,
      batch_size=4,
      max_new_tokens=NEW,
      progress=False,
  )
  got = {r["question_id"]: r["text"] for r in map(json.loads, open(tmp_path / "out" / "synthetic_answers.jsonl"))}
  for r in rows:
    files = r["image"] if isinstance(r["image"], list) else [r["image"]]
    text = prompt_text(r, "synthetic")
    text = text if len(files) > 1 else f"<image>\n{text}"  # the evaluator's placement (LLaVA's)
    images = [Image.open(os.path.join(path, f)).convert("RGB") for f in files]
    want = loaded.answer([{"from": "human", "value": text}], images, max_new_tokens=NEW)
    assert got[r["question_id"]] == want, r["question_id"]
