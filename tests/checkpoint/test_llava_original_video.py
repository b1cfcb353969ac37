"""Original lmms-lab OneVision checkpoints' video settings (``llava_original.video_options``):
a tiny random HF ``LlavaOnevisionForConditionalGeneration`` (``test_llava_video``'s
builder) written in the LLaVA-NeXT repository's layout (``test_llava_original``'s writer)
with OneVision's video fields (``mm_spatial_pool_mode="bilinear"``, stride 2,
``mm_newline_position="one_token"``), loaded by ``load_llava_original`` and checked against
HF's video path on the same weights: logits of an image + video row and a video row
(whole model 1e-4), greedy tokens of ``load_model(...)`` equal to HF ``generate``, and
``python -m llava_jax.generate --video`` equal to ``LoadedModel.answer``."""

import copy
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import sibling
from sibling import ROOT
import tiny_checkpoint
from llava_jax.checkpoint.convert.llava_original import load_llava_original, video_options
from llava_jax.data import anyres as data_anyres
from llava_jax.data import images as im
from llava_jax.infer.loading import load_model
from llava_jax.infer.sampler import generate
from llava_jax.models import anyres, video
from llava_jax.tokenizer import train_sentencepiece

original = sibling.load("tests/checkpoint/test_llava_original.py")
video_generate = sibling.load("tests/infer/test_video_generate.py")  # its HF generate call
llava_video = video_generate.llava_video

SIZE, FRAMES, NEW = 35, 4, video_generate.NEW  # 35 px / 7: a 5x5 grid pooled to 3x3 (real bilinear taps)
ONEVISION_VIDEO = dict(mm_spatial_pool_mode="bilinear", mm_spatial_pool_stride=2, mm_newline_position="one_token")


@pytest.fixture(scope="module")
def ov_original(tmp_path_factory):
  """(HF model, original checkpoint dir with a tokenizer, clip): OneVision, SigLIP + Qwen2."""
  model = llava_video._hf_model(SIZE)
  s = SIZE
  model.config.image_grid_pinpoints = [[s, s], [2 * s, s], [s, 2 * s], [2 * s, 2 * s]]  # what OV_RANGE means
  root = tmp_path_factory.mktemp("ov_video")
  tower = copy.deepcopy(model.config.vision_config)
  tower.num_hidden_layers = 4  # the hub tower: the original deletes its last layer
  tower.save_pretrained(root / "tower")
  path = root / "original"
  path.mkdir()
  save_file(original._original_anyres_tensors(model, "llava_onevision"), str(path / "model.safetensors"))
  config = original._original_anyres_config(model, "llava_onevision", str(root / "tower"))
  (path / "config.json").write_text(json.dumps({**config, **ONEVISION_VIDEO}))
  train_sentencepiece(tiny_checkpoint._sentences(), vocab_size=110).save(str(path / "tokenizer.model"))
  return model, str(path), llava_video._write_video(root / "clip.mkv")


def _to_hf(ids, cfg):
  """Our placeholders (one past the vocabulary) -> the HF model's image / video token ids."""
  out = np.where(ids == cfg.image_token_id, llava_video.IMAGE_TOKEN, ids)
  return np.where(ids == cfg.video_token_id, llava_video.VIDEO_TOKEN, out)


def test_video_config_and_logits_match_hf(ov_original):
  model, path, clip = ov_original
  cfg, params = load_llava_original(path)
  vocab = model.config.text_config.vocab_size
  assert (cfg.video_token_id, cfg.video_pooling, cfg.video_pool_stride) == (vocab + 1, "bilinear", 2)
  assert cfg.image_token_id == vocab and video.num_video_tokens(cfg, FRAMES) == FRAMES * 9 + 1
  frames = llava_video._frames(cfg, clip, FRAMES)
  img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 100, 3), dtype=np.uint8))
  tiles, size = data_anyres.preprocess_anyres(img, im.image_config_for("siglip", SIZE), cfg.image_grid_pinpoints)
  layout = anyres.image_layout(np.array([size]), cfg)
  nv = video.num_video_tokens(cfg, FRAMES)
  ids, mask = llava_video._ids(
      cfg,
      [
          [("text", 2), ("image", int(layout.num_tokens[0])), ("text", 3), ("video", nv), ("text", 2)],
          [("text", 4), ("video", nv), ("text", 3)],
      ],
  )
  videos = np.stack([frames, frames[::-1]])
  ref = llava_video._hf_logits(model, _to_hf(ids, cfg), mask, videos, tiles[None], [size])
  px = data_anyres.pad_tiles(tiles, cfg.tiles_per_image)[None]
  out = np.asarray(llava_video._forward(cfg)(params, ids, mask, px, layout, videos, None))
  err = np.abs(out[mask == 1] - ref[mask == 1]).max()
  print(f"original OneVision, image + video rows vs HF: max |logit diff| {err:.2e}")
  assert err < 1e-4


def test_generate_and_cli_answer_a_video_as_hf_does(ov_original):
  """What a user types: ``python -m llava_jax.generate --checkpoint=<original dir> --video=``."""
  model, path, clip = ov_original
  loaded = load_model(path, template="llava_v1")  # Qwen2's chatml markers are not in this tokenizer
  assert loaded.source == "llava_original" and loaded.cfg.video_token_id is not None
  conversation = [{"from": "human", "value": "<video>\nWhere is the circle?"}]
  media = loaded.preprocess_media(conversation, videos=clip, num_frames=FRAMES)
  _, ids = loaded.encode_prompt(conversation, media.image_sizes, media.video_frames)
  assert np.sum(ids == loaded.cfg.video_token_id) == video.num_video_tokens(loaded.cfg, FRAMES)
  ref = video_generate._hf_generate(model, loaded, _to_hf(ids, loaded.cfg), media.pixel_values_videos)
  ours = generate(
      loaded.cfg,
      loaded.params,
      ids[None],
      pixel_values_videos=media.pixel_values_videos,
      max_new_tokens=NEW,
      stop_token_ids=loaded.stop_token_ids(),
  )
  np.testing.assert_array_equal(np.asarray(ours)[0], ref)
  want = loaded.answer(conversation, video=clip, num_frames=FRAMES, max_new_tokens=NEW)
  assert want and want == loaded.decode_answer(ref)
  proc = subprocess.run(
      [sys.executable, "-m", "llava_jax.generate", f"--checkpoint={path}", "--template=llava_v1"]
      + [f"--video={clip}", f"--video_frames={FRAMES}", "--prompt=Where is the circle?", f"--max_new_tokens={NEW}"],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == want


_BASE = {"mm_patch_merge_type": "spatial_unpad", **ONEVISION_VIDEO}


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"mm_spatial_pool_mode": "average"}, "mm_spatial_pool_mode 'average' pools after the projector"),
        ({"mm_newline_position": "grid"}, "mm_newline_position 'grid'; only 'one_token'"),
        ({"mm_newline_position": "frame"}, "mm_newline_position 'frame'"),
        ({"add_faster_video": True}, "add_faster_video is set"),
        ({"mm_resampler_type": "spatial_pool"}, "mm_resampler_type 'spatial_pool'"),
        ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type 'flat'"),
        ({"mm_spatial_pool_stride": 0}, "mm_spatial_pool_stride 0 is not a positive int"),
    ],
)
def test_video_settings_not_implemented_are_logged_not_read(fields, reason, caplog):
  with caplog.at_level(logging.WARNING):
    assert video_options({**_BASE, **fields}, 128, "/ckpt") == {}
  assert reason in caplog.text and "/ckpt/config.json" in caplog.text and "taken as its frames" in caplog.text


def test_video_defaults_and_image_only_checkpoints(caplog):
  """``mm_newline_position`` and the stride default as the original's ``getattr``s do; a
  config without ``mm_spatial_pool_mode`` (LLaVA-1.5, NeXT v1.6) has no video path."""
  assert video_options({"mm_patch_merge_type": "spatial_unpad", "mm_spatial_pool_mode": "bilinear"}, 151646, "/c") == {
      "video_token_id": 151647,
      "video_pooling": "bilinear",
      "video_pool_stride": 2,
  }
  with caplog.at_level(logging.WARNING):
    assert video_options({"mm_patch_merge_type": "spatial_unpad"}, 128, "/c") == {}
  assert not caplog.text
