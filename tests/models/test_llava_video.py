"""Video parity with HF ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2): frames
decoded and sampled by ``data.video`` from a real file, preprocessed per frame, pooled
bilinearly on the patch grid (``apply_pooling``), one ``image_newline`` per video, merged
at ``video_token_id`` beside an anyres image; the model loaded through ``load_hf_llava``.

transformers' ``LlavaOnevisionVideoProcessor`` needs torchvision, which is not installed
here (its wheels pull a CUDA torch); per frame it resizes to S x S (bicubic), rescales and
normalises, which is ``SiglipImageProcessorPil`` at S: that is the reference the frames
are checked against, and both models get the same pixel values.
"""

import dataclasses
import functools
import logging
import types

import av
import jax
import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

import tiny_hf
from llava_jax.checkpoint.convert.hf import load_hf_llava, save_hf_llava
from llava_jax.data import anyres as data_anyres
from llava_jax.data import images as im
from llava_jax.data import video as data_video
from llava_jax.models import Llava, LlavaConfig, anyres, video

logging.getLogger("transformers").setLevel(logging.ERROR)

IMAGE_TOKEN, VIDEO_TOKEN, FRAMES = 127, 126, 4


def _write_video(path, n=12, w=64, h=48):
  rng = np.random.default_rng(1)
  with av.open(str(path), "w") as c:
    s = c.add_stream("ffv1", rate=6)
    s.width, s.height, s.pix_fmt = w, h, "bgr0"
    for _ in range(n):
      for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return str(path)


def _hf_model(size):
  """size 28: a 4x4 grid pooled to 2x2 (a 2x2 mean); 35: 5x5 to 3x3 (real bilinear taps, as 27 -> 14)."""
  pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
  cfg = tf.LlavaOnevisionConfig(
      vision_config=tf.SiglipVisionConfig(
          hidden_size=64,
          intermediate_size=128,
          num_hidden_layers=3,
          num_attention_heads=4,
          image_size=size,
          patch_size=7,
      ),
      text_config=tiny_hf.text_config("qwen2"),
      image_token_index=IMAGE_TOKEN,
      video_token_index=VIDEO_TOKEN,
      image_grid_pinpoints=pinpoints,
      vision_aspect_ratio="anyres_max_1",
  )
  return tiny_hf.randomize_(tf.LlavaOnevisionForConditionalGeneration(cfg), seed=11)


@pytest.fixture(scope="module", params=[28, 35])
def hf_video(request, tmp_path_factory):
  model = _hf_model(request.param)
  path = tmp_path_factory.mktemp(f"onevision_{request.param}")
  model.save_pretrained(path)
  cfg, params = load_hf_llava(str(path))
  clip = _write_video(path / "clip.mkv")
  return model, cfg, params, clip


def _frames(cfg, clip, num_frames=FRAMES):
  """float32[F, S, S, 3]: our sampling and preprocessing, checked against HF's per-frame processor."""
  sampled = data_video.sample_frames(clip, num_frames=num_frames)
  s = cfg.vision.image_size
  ours = np.stack([im.preprocess(f, im.image_config_for("siglip", s)) for f in sampled.frames])
  proc = tf.SiglipImageProcessorPil(size={"height": s, "width": s})
  ref = proc([Image.fromarray(f) for f in sampled.frames], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  assert np.abs(ours - ref).max() <= 1e-5
  return ours


def _ids(cfg, pieces, seed=0):
  """One row per entry: ``pieces`` is a list of ("text", n) / ("image", n) / ("video", n)."""
  rng = np.random.default_rng(seed)
  tok = {"image": cfg.image_token_id, "video": cfg.video_token_id}
  rows = [
      [t for kind, n in row for t in (rng.integers(3, 100, n) if kind == "text" else [tok[kind]] * n)] for row in pieces
  ]
  ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, : len(r)], mask[i, : len(r)] = r, 1
  return ids, mask


@functools.cache
def _forward(cfg):
  return jax.jit(
      lambda p, i, m, x, lay, v, vm: Llava(cfg).apply(
          {"params": p}, i, x, m, image_layout=lay, pixel_values_videos=v, video_mask=vm
      )
  )


def _hf_logits(model, ids, mask, videos, images=None, sizes=None):
  kw = {}
  if images is not None:
    kw = dict(pixel_values=torch.from_numpy(images.transpose(0, 1, 4, 2, 3).copy()), image_sizes=torch.tensor(sizes))
  with torch.no_grad():
    return model(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        pixel_values_videos=torch.from_numpy(videos.transpose(0, 1, 4, 2, 3).copy()),
        **kw,
    ).logits.numpy()


def test_config_from_hf(hf_video):
  model, cfg, _, _ = hf_video
  assert (cfg.video_token_id, cfg.video_pooling, cfg.video_pool_stride) == (VIDEO_TOKEN, "bilinear", 2)
  p = model.config.vision_config.image_size // 7
  assert video.num_video_tokens(cfg, FRAMES) == FRAMES * ((p + 1) // 2) ** 2 + 1


def test_video_and_image_logits_match_hf(hf_video):
  """Row 0: text, an anyres image, text, a video, text; row 1: text, a video, text (right padded)."""
  model, cfg, params, clip = hf_video
  frames = _frames(cfg, clip)
  videos = np.stack([frames, frames[::-1]])  # two videos: the second in reverse order
  rng = np.random.default_rng(4)
  img = Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8))
  tiles, size = data_anyres.preprocess_anyres(
      img, im.image_config_for("siglip", cfg.vision.image_size), cfg.image_grid_pinpoints
  )
  px = data_anyres.pad_tiles(tiles, cfg.tiles_per_image)[None]
  layout = anyres.image_layout(np.array([size]), cfg)
  nv = video.num_video_tokens(cfg, FRAMES)
  ids, mask = _ids(
      cfg,
      [
          [("text", 2), ("image", int(layout.num_tokens[0])), ("text", 3), ("video", nv), ("text", 2)],
          [("text", 4), ("video", nv), ("text", 3)],
      ],
  )
  ref = _hf_logits(model, ids, mask, videos, tiles[None], [size])  # HF raises if our counts differ
  out = np.asarray(_forward(cfg)(params, ids, mask, px, layout, videos, None))
  valid = mask.astype(bool)
  err = np.abs(out[valid] - ref[valid]).max()
  print(f"OneVision S={cfg.vision.image_size}: {nv} tokens per {FRAMES}-frame video, max |logit diff| {err:.2e}")
  assert err < 1e-4


@pytest.mark.parametrize("hf_video", [35], indirect=True)  # one geometry: the file stays under a minute
def test_video_slots_and_count_checks(hf_video):
  """[B, M] video slots with an empty one; a missing placeholder is refused eagerly and under jit."""
  model, cfg, params, clip = hf_video
  frames = _frames(cfg, clip)
  nv = video.num_video_tokens(cfg, FRAMES)
  ids, mask = _ids(cfg, [[("text", 3), ("video", nv), ("text", 2)], [("text", 5), ("video", nv)]], seed=2)
  slots = np.zeros((2, 2) + frames.shape, np.float32)
  slots[0, 0], slots[1, 0], slots[1, 1] = frames, frames[::-1], 5.0  # [1, 1] is an empty slot's garbage
  vmask = np.array([[1, 0], [1, 0]], bool)
  ref = _hf_logits(model, ids, mask, np.stack([frames, frames[::-1]]))
  out = np.asarray(_forward(cfg)(params, ids, mask, None, None, slots, vmask))
  assert np.abs(out[mask == 1] - ref[mask == 1]).max() < 1e-4
  bad = ids.copy()
  bad[1, 6] = 9  # row 1 one video placeholder short
  with pytest.raises(ValueError, match=f"sample 1 of the batch has {nv - 1} video placeholder tokens, not a multiple"):
    Llava(cfg).apply({"params": params}, bad, None, mask, pixel_values_videos=slots, video_mask=vmask)
  with pytest.raises(Exception, match="sample 1 of the batch has .* video placeholder tokens"):
    jax.block_until_ready(_forward(cfg)(params, bad, mask, None, None, slots, vmask))
  with pytest.raises(ValueError, match="video placeholder/feature count mismatch: the batch has 0 .* but 1 videos"):
    Llava(cfg).apply({"params": params}, ids[:1, :3], None, None, pixel_values_videos=frames[None])
  with pytest.raises(
      ValueError,
      match=rf"the batch has {2 * nv} video placeholder tokens \(per sample \[{nv}, {nv}\]\) but no pixel_values_videos",
  ):
    Llava(cfg).apply({"params": params}, ids, None, mask)


def test_pool_frames_matches_hf_apply_pooling_at_onevision_geometry():
  """384 px / 14 = 27x27 patches pooled to 14x14, as OneVision's checkpoints run."""
  hf_self = types.SimpleNamespace(
      config=types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=384, patch_size=14))
  )
  x = torch.randn(3, 27 * 27, 16, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    ref = tf.LlavaOnevisionModel.apply_pooling(hf_self, x).numpy()
  cfg = types.SimpleNamespace(vision=hf_self.config.vision_config, video_pooling="bilinear", video_pool_stride=2)
  out = np.asarray(jax.jit(lambda a: video.pool_frames(a, cfg))(x.numpy()))
  assert out.shape == ref.shape == (3, 14 * 14, 16)
  err = np.abs(out - ref).max()
  print(f"apply_pooling 27x27 -> 14x14: max |diff| {err:.1e}")
  assert err < 1e-5


@pytest.mark.parametrize("hf_video", [35], indirect=True)
def test_save_load_round_trip_and_configs(hf_video, tmp_path):
  model, cfg, params, _ = hf_video
  save_hf_llava(cfg, params, str(tmp_path))
  again = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(str(tmp_path))
  assert again.config.video_token_id == VIDEO_TOKEN
  assert load_hf_llava(str(tmp_path))[0] == cfg
  assert LlavaConfig.from_dict(cfg.to_dict()) == cfg
  assert not {"video_token_id", "video_pooling", "video_pool_stride"} & set(LlavaConfig().to_dict())
  with pytest.raises(ValueError, match="set together"):
    LlavaConfig(video_token_id=5)
  with pytest.raises(ValueError, match="needs an anyres config"):
    LlavaConfig(video_token_id=5, video_pooling="bilinear", video_pool_stride=2)
  images_only = dataclasses.replace(cfg, video_token_id=None, video_pooling=None, video_pool_stride=None)
  frames = np.zeros((1, FRAMES, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32)
  with pytest.raises(ValueError, match="no video_token_id"):
    Llava(images_only).apply({"params": params}, np.full((1, 3), 5, np.int32), pixel_values_videos=frames)


@pytest.mark.parametrize("mode", ["average", "max"])
def test_llava_next_video_logits_match_hf(mode, tmp_path):
  """LlavaNextVideoForConditionalGeneration (CLIP + Llama): the tower's 4x4 grid pooled 2x2
  before the projector, no newline; a row with a video and an anyres image, one with a video."""
  pinpoints = [[28, 56], [56, 28], [56, 56]]
  hf_cfg = tf.LlavaNextVideoConfig(
      vision_config=tiny_hf.clip_vision_config(),
      text_config=tiny_hf.text_config("llama"),
      image_token_index=IMAGE_TOKEN,
      video_token_index=VIDEO_TOKEN,
      image_grid_pinpoints=pinpoints,
      spatial_pool_mode=mode,
      spatial_pool_stride=2,
  )
  model = tiny_hf.randomize_(tf.LlavaNextVideoForConditionalGeneration(hf_cfg), seed=12)
  model.save_pretrained(tmp_path / "hf")
  cfg, params = load_hf_llava(str(tmp_path / "hf"))
  assert (cfg.video_token_id, cfg.video_pooling, cfg.video_pool_stride) == (VIDEO_TOKEN, mode, 2)
  clip = _write_video(tmp_path / "clip.mkv")
  sampled = data_video.sample_frames(clip, num_frames=3)
  frames = np.stack([im.preprocess(f, im.image_config_for("clip", 28)) for f in sampled.frames])
  videos = np.stack([frames, frames[::-1]])
  rng = np.random.default_rng(5)
  img = Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8))
  tiles, size = data_anyres.preprocess_anyres(img, im.image_config_for("clip", 28), cfg.image_grid_pinpoints)
  layout = anyres.image_layout(np.array([size]), cfg)
  nv = video.num_video_tokens(cfg, 3)
  assert nv == 3 * 2 * 2
  ids, mask = _ids(
      cfg,
      [
          [("text", 2), ("video", nv), ("text", 3), ("image", int(layout.num_tokens[0])), ("text", 2)],
          [("text", 4), ("video", nv), ("text", 3)],
      ],
  )
  ref = _hf_logits(model, ids, mask, videos, tiles[None], [size])
  px = data_anyres.pad_tiles(tiles, cfg.tiles_per_image)[None]
  out = np.asarray(_forward(cfg)(params, ids, mask, px, layout, videos, None))
  valid = mask.astype(bool)
  err = np.abs(out[valid] - ref[valid]).max()
  print(f"LlavaNextVideo ({mode}): {nv} tokens per 3-frame video, max |logit diff| {err:.2e}")
  assert err < 1e-4
  save_hf_llava(cfg, params, str(tmp_path / "ours"))
  assert load_hf_llava(str(tmp_path / "ours"))[0] == cfg
  again = tf.LlavaNextVideoForConditionalGeneration.from_pretrained(str(tmp_path / "ours"))
  assert (again.config.spatial_pool_mode, again.config.video_token_id) == (mode, VIDEO_TOKEN)
