"""Video through what a user types: ``generate(..., pixel_values_videos=)``,
``LoadedModel.answer(..., video=)``, ``python -m llava_jax.generate --video=`` and the
evaluator, on a small real mp4 (a moving disc, ``tests/data/test_video.py``'s writer).

(a) A tiny random HF ``LlavaOnevisionForConditionalGeneration`` (``test_llava_video``'s
builder) saved with ``save_pretrained``: our greedy tokens equal HF ``generate`` given our
prompt ids and our preprocessed frames (HF's video processor needs torchvision, not
installed; ``test_llava_video`` checks our frames against its per-frame processor).
(b) A tiny LLaVA-1.5 checkpoint, which has no video token: the video's frames are images.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sibling
from sibling import ROOT
import tiny_checkpoint
from llava_jax.infer.loading import load_model
from llava_jax.infer.sampler import generate, prefill
from llava_jax.models.video import num_video_tokens
from llava_jax.tokenizer import train_sentencepiece

video_files = sibling.load("tests/data/test_video.py")
llava_video = sibling.load("tests/models/test_llava_video.py")

NEW, FRAMES = 6, 4
QUESTION = "Where is the circle?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return video_files._write(tmp_path_factory.mktemp("clip") / "clip.mp4", "libx264")


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
  """(HF model, directory, LoadedModel): SigLIP 28 px (a 4x4 grid pooled to 2x2) + Qwen2."""
  model = llava_video._hf_model(28)
  path = tmp_path_factory.mktemp("onevision")
  model.save_pretrained(path)
  train_sentencepiece(tiny_checkpoint._sentences(), vocab_size=110).save(str(path / "tokenizer.model"))
  # Qwen2 would get the chatml template, whose markers this tokenizer lacks.
  return model, str(path), load_model(str(path), template="llava_v1")


def _hf_generate(model, loaded, ids, videos):
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.from_numpy(ids[None]).long(),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values_videos=torch.from_numpy(videos.transpose(0, 1, 4, 2, 3).copy()),
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=loaded.cfg.pad_token_id,
        eos_token_id=loaded.stop_token_ids(),
    )[0, len(ids) :].numpy()
  return np.pad(out, (0, NEW - len(out)), constant_values=loaded.cfg.pad_token_id)  # HF stops early


def _cli(*args, ok=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
      [sys.executable, "-m", "llava_jax.generate", *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      timeout=300,
  )
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_onevision_video_equals_hf_generate_and_the_cli(onevision, clip):
  model, path, loaded = onevision
  cfg = loaded.cfg
  conversation = [{"from": "human", "value": f"<video>\n{QUESTION}"}]
  media = loaded.preprocess_media(conversation, videos=clip, num_frames=FRAMES)
  assert media.pixels is None and media.video_frames == [FRAMES]
  np.testing.assert_array_equal(media.pixel_values_videos[0], llava_video._frames(cfg, clip, FRAMES))
  _, ids = loaded.encode_prompt(conversation, media.image_sizes, media.video_frames)
  run = np.flatnonzero(ids == cfg.video_token_id)
  assert len(run) == num_video_tokens(cfg, FRAMES) and np.all(np.diff(run) == 1)
  ref = _hf_generate(model, loaded, ids, media.pixel_values_videos)
  ours = generate(
      cfg,
      loaded.params,
      ids[None],
      pixel_values_videos=media.pixel_values_videos,
      max_new_tokens=NEW,
      stop_token_ids=loaded.stop_token_ids(),
  )
  np.testing.assert_array_equal(np.asarray(ours)[0], ref)
  # prefill's last logits: HF's within the whole-model tolerance, and the frames' order
  # changes them by far more than that.
  last = {}
  for name, videos in (("forward", media.pixel_values_videos), ("backward", media.pixel_values_videos[:, ::-1])):
    last[name] = np.asarray(
        prefill(cfg, loaded.params, ids[None], pixel_values_videos=videos, cache_len=len(ids) + 1)[0]
    )[0]
  with torch.no_grad():
    hf = (
        model(
            input_ids=torch.from_numpy(ids[None]).long(),
            pixel_values_videos=torch.from_numpy(media.pixel_values_videos.transpose(0, 1, 4, 2, 3).copy()),
        )
        .logits[0, -1]
        .numpy()
    )
  err = np.abs(last["forward"] - hf).max()
  print(f"OneVision video prefill vs HF: max |logit diff| {err:.2e}")
  assert err < 1e-4
  assert np.abs(last["forward"] - last["backward"]).max() > 100 * err
  want = loaded.answer(conversation, video=clip, num_frames=FRAMES, max_new_tokens=NEW)
  assert want and want == loaded.decode_answer(ref)
  out = _cli(
      f"--checkpoint={path}",
      "--template=llava_v1",
      f"--video={clip}",
      f"--video_frames={FRAMES}",
      f"--prompt={QUESTION}",
      f"--max_new_tokens={NEW}",
  )
  assert out.stdout.strip() == want


def test_onevision_video_batch_on_a_mesh(onevision, clip):
  """[B, M, F, S, S, 3] videos with video_mask (row 1: text only, left-padded), params and
  batch on a 2x2x2 mesh: each row's tokens equal its single-row generation."""
  from llava_jax import sharding

  _, path, single = onevision
  loaded = load_model(path, template="llava_v1", mesh=sharding.make_mesh((2, 2, 2)))
  rows = [([{"from": "human", "value": f"<video>\n{QUESTION}"}], clip), ([{"from": "human", "value": QUESTION}], None)]
  prompts, refs = [], []
  for conversation, video in rows:
    media = single.preprocess_media(conversation, videos=video, num_frames=FRAMES)
    _, ids = single.encode_prompt(conversation, media.image_sizes, media.video_frames)
    prompts.append((ids, media.pixel_values_videos))
    refs.append(
        generate(
            single.cfg, single.params, ids[None], pixel_values_videos=media.pixel_values_videos, max_new_tokens=NEW
        )[0]
    )
  t = max(len(ids) for ids, _ in prompts)
  ids, mask = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
  videos, video_mask = np.zeros((2, 1) + prompts[0][1].shape[1:], np.float32), np.zeros((2, 1), bool)
  for r, (row_ids, row_videos) in enumerate(prompts):
    ids[r, t - len(row_ids) :], mask[r, t - len(row_ids) :] = row_ids, 1
    if row_videos is not None:
      videos[r], video_mask[r] = row_videos, True
  out = generate(
      loaded.cfg,
      loaded.params,
      ids,
      None,
      mask,
      pixel_values_videos=videos,
      video_mask=video_mask,
      max_new_tokens=NEW,
      mesh=loaded.mesh,
  )
  np.testing.assert_array_equal(np.asarray(out), np.stack([np.asarray(r) for r in refs]))
  with pytest.raises(ValueError, match=r"sample 0 of the batch has \d+ video placeholder tokens but its videos need 0"):
    generate(
        loaded.cfg,
        loaded.params,
        ids,
        None,
        mask,
        pixel_values_videos=videos,
        video_mask=video_mask[::-1],
        max_new_tokens=1,
        mesh=loaded.mesh,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return tiny_checkpoint.write_tiny_llava(str(tmp_path_factory.mktemp("tiny_video")))


def test_frames_as_images_cli_equals_answer_with_the_frames(tiny, clip):
  """No video token (LLaVA-1.5): the <video> tag becomes FRAMES <image> tags, the frames
  the images; the CLI's answer equals LoadedModel.answer given the frames as images."""
  from llava_jax.data.video import sample_frames

  loaded = load_model(tiny["model"], template="vicuna_v1@inline")
  frames = [Image.fromarray(f) for f in sample_frames(clip, num_frames=FRAMES).frames]
  as_images = [{"from": "human", "value": "Frames: " + " ".join(["<image>"] * FRAMES) + f"\n{QUESTION}"}]
  as_video = [{"from": "human", "value": f"Frames: <video>\n{QUESTION}"}]
  want = loaded.answer(as_images, frames, max_new_tokens=NEW)
  assert want and loaded.encode_prompt(as_video, video_frames=FRAMES)[0] == loaded.encode_prompt(as_images)[0]
  assert loaded.answer(as_video, video=clip, num_frames=FRAMES, max_new_tokens=NEW) == want
  # With an image before the video: the image, then the frames, in the order of the tags.
  image = Image.open(tiny["image"]).convert("RGB")
  mixed = [{"from": "human", "value": f"<image> then <video>\n{QUESTION}"}]
  got = loaded.preprocess_media(mixed, image, clip, num_frames=FRAMES)
  np.testing.assert_array_equal(got.pixels, loaded.preprocess_images([image] + frames)[0])
  text, ids = loaded.encode_prompt(mixed, got.image_sizes, got.video_frames)
  assert text.count("<image>") == 1 + FRAMES and "<video>" not in text
  assert (ids == loaded.cfg.image_token_id).sum() == (1 + FRAMES) * loaded.cfg.num_image_tokens
  with pytest.raises(ValueError, match=r"1 <image> and 1 <video> tag\(s\) but 1 image\(s\) and 2 video"):
    loaded.preprocess_media(mixed, image, [clip, clip], num_frames=FRAMES)
  with pytest.raises(ValueError, match=r"1 <video> tag\(s\) but frame counts for 0 video"):
    loaded.encode_prompt(mixed, got.image_sizes)
  out = _cli(
      f"--checkpoint={tiny['model']}",
      "--template=vicuna_v1@inline",
      f"--video={clip}",
      f"--video_frames={FRAMES}",
      f"--prompt=Frames: <video>\n{QUESTION}",
      f"--max_new_tokens={NEW}",
  )
  assert out.stdout.strip() == want


def test_bad_video_is_a_usage_error_naming_it(tiny, tmp_path):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"not a video at all" * 10)
  proc = _cli(f"--checkpoint={tiny['model']}", f"--video={bad}", "--prompt=Hi", ok=False)
  assert proc.returncode != 0 and "--video:" in proc.stderr and str(bad) in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_evaluator_answers_a_video_and_an_image_question(tiny, clip, tmp_path):
  """Frames-as-images model: the video row's answer equals LoadedModel.answer with the
  video, the image row's with the image; a bad video is an error row, not a crash."""
  from llava_jax.eval.run import run_eval

  loaded = load_model(tiny["model"])
  (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
  rows = [
      {"question_id": "v", "video": clip, "text": QUESTION},
      {"question_id": "i", "image": "0.png", "text": QUESTION},
      {"question_id": "bad", "video": str(tmp_path / "broken.mp4"), "text": QUESTION},
  ]
  questions = tmp_path / "questions.jsonl"
  questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  metrics = run_eval(
      loaded,
      tmp_path / "out",
      task="synthetic",
      questions=questions,
      image_root=tiny["images"],
      batch_size=2,
      max_new_tokens=NEW,
      video_frames=FRAMES,
      progress=False,
  )
  got = {r["question_id"]: r for r in map(json.loads, open(tmp_path / "out" / "synthetic_answers.jsonl"))}
  from llava_jax.eval.tasks import prompt_text

  text = prompt_text(rows[0], "synthetic")
  assert got["v"]["text"] == loaded.answer(
      [{"from": "human", "value": f"<video>\n{text}"}], video=clip, num_frames=FRAMES, max_new_tokens=NEW
  )
  image = Image.open(os.path.join(tiny["images"], "0.png")).convert("RGB")
  assert got["i"]["text"] == loaded.answer([{"from": "human", "value": f"<image>\n{text}"}], image, max_new_tokens=NEW)
  assert "broken.mp4" in got["bad"]["metadata"]["error"] and got["bad"]["text"] == ""
  assert metrics["synthetic/errors"] == 1
