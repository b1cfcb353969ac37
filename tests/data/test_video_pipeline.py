"""Videos through the training pipeline, from real files (PyAV-decoded, F frames sampled as
transformers samples them): as frames-as-images for a model without a video token, into
``pixel_values_videos`` slots for one with (OneVision-style pooling), LLaVA-Video's
``<image>``-marked records, bad files counted as ``bad_video``, packing, and the step's
loss on such a batch equal to the model's on the same frames."""

import dataclasses

import jax
import numpy as np
import pytest

from llava_jax.data import pipeline as P
from llava_jax.data import synthetic as sy
from llava_jax.data import video as data_video
from llava_jax.data.images import image_config_for, preprocess
from llava_jax.data.tokenize import IGNORE
from llava_jax.models import configs, video
from llava_jax.models.llava import Llava, init_params
from llava_jax.tokenizer import load_tokenizer
from llava_jax.train import step as step_lib

F = 3
SIZE = 28


def _cfg(tok, pooling: str | None):
  """No video token (pooling None); NeXT-Video's "average"; OneVision's "bilinear" (anyres)."""
  vision = configs.VISION_VARIANTS["clip-tiny"]
  llm = dataclasses.replace(
      configs.LLM_VARIANTS["tiny"], vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2
  )
  extra = {}
  if pooling is not None:
    extra = dict(video_token_id=tok.vocab_size, video_pooling=pooling, video_pool_stride=2)
  if pooling == "bilinear":
    extra["image_grid_pinpoints"] = ((28, 56), (56, 28), (56, 56))
  return configs.llava_config(vision, llm, image_token_id=tok.token_to_id(sy.IMAGE_TOKEN), **extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  paths = sy.write_synthetic(d / "shapes", seed=0, n_train=8, n_val=2, image_size=SIZE)
  tok = load_tokenizer(paths["tokenizer"])
  rng = np.random.default_rng(0)
  clips = [
      data_video.write_video(d / f"clip{k}.mkv", rng.integers(0, 256, (7, 30, 40, 3), dtype=np.uint8)) for k in range(2)
  ]
  image = paths["images"] + "/" + sorted(__import__("os").listdir(paths["images"]))[0]
  turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  records = [
      {"id": "ours", "videos": [clips[0]], "conversations": turn("<video>\nWhich way does it move?", "left")},
      # LLaVA-Video-178K: the video under "video", marked with <image>
      {"id": "llava-video", "video": clips[1], "conversations": turn("<image>\nWhat happens?", "it moves")},
      {"id": "both", "images": [image], "videos": [clips[1]], "conversations": turn("<image> then <video>?", "yes")},
      {"id": "text", "conversations": turn("Hello?", "hi")},
  ]
  return tok, records, clips, image


def _spec(tok, cfg, **over):
  kw = dict(tokenizer=tok, template="vicuna_v1@inline", image_config=image_config_for("clip", SIZE), max_len=256)
  kw |= dict(max_images=4, video_frames=F, max_videos=1 if cfg.video_token_id is not None else 0) | over
  return P.ExampleSpec.for_model(cfg, **kw)


def _one_pass(spec, n, **over):
  kw = dict(batch_size=n, seed=0, shuffle=False, num_epochs=1, process_index=0, process_count=1)
  return P.PipelineConfig(spec, **(kw | over))


def _frames(path):
  return data_video.sample_frames(path, num_frames=F).frames


def test_a_model_without_a_video_token_sees_the_frames_as_images(data):
  tok, records, clips, image = data
  cfg = _cfg(tok, None)
  spec = _spec(tok, cfg)
  (batch,) = list(P.make_dataset(records, _one_pass(spec, len(records))))
  assert "pixel_values_videos" not in batch
  ic = spec.image_config
  media = {"ours": list(_frames(clips[0])), "llava-video": list(_frames(clips[1])), "text": []}
  from llava_jax.data.images import load_image

  media["both"] = [load_image(image)] + list(_frames(clips[1]))
  for row, rid in enumerate(batch["ids"]):
    want = media[rid]
    assert batch["image_mask"][row].tolist() == [k < len(want) for k in range(4)]
    assert (batch["input_ids"][row] == cfg.image_token_id).sum() == len(want) * cfg.num_image_tokens
    for k, m in enumerate(want):
      np.testing.assert_array_equal(batch["pixel_values"][row, k], preprocess(m, ic))


@pytest.mark.parametrize("pooling", ["average", "bilinear"])
def test_video_slots_of_a_model_with_a_video_token(data, pooling):
  tok, records, clips, _ = data
  cfg = _cfg(tok, pooling)
  spec = _spec(tok, cfg)
  it = P.make_dataset(records, _one_pass(spec, len(records)))
  (batch,) = list(it)
  assert set(batch) == set(spec.keys()) and batch["pixel_values_videos"].shape == (len(records), 1, F, SIZE, SIZE, 3)
  frame_cfg = data_video.video_image_config(cfg, spec.image_config)
  n_video = video.num_video_tokens(cfg, F)
  want = {"ours": clips[0], "llava-video": clips[1], "both": clips[1], "text": None}
  for row, rid in enumerate(batch["ids"]):
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    clip = want[rid]
    assert batch["video_mask"][row].tolist() == [clip is not None]
    assert (ids == cfg.video_token_id).sum() == (n_video if clip else 0)
    assert not (labels[ids == cfg.video_token_id] != IGNORE).any()
    if clip:
      for f, frame in enumerate(_frames(clip)):
        np.testing.assert_array_equal(batch["pixel_values_videos"][row, 0, f], preprocess(frame, frame_cfg))
    else:
      assert not batch["pixel_values_videos"][row].any()
  # "both": the image's placeholders come before the video's, as the text orders them
  row = list(batch["ids"]).index("both")
  at = np.flatnonzero(np.isin(batch["input_ids"][row], [cfg.image_token_id, cfg.video_token_id]))
  kinds = batch["input_ids"][row][at]
  n_image = int(batch["image_tokens"][row, 0]) if cfg.anyres else cfg.num_image_tokens
  assert (kinds[:n_image] == cfg.image_token_id).all() and (kinds[n_image:] == cfg.video_token_id).all()

  # The step's loss on the batch == the model's on the same frames, passed flat.
  params = init_params(cfg, jax.random.key(0))
  loss, _ = step_lib.loss_fn(params, {k: batch[k] for k in spec.keys() if k != "ids"}, cfg, step_lib.StepConfig())
  real_v, real_i = batch["video_mask"].reshape(-1), batch["image_mask"].reshape(-1)
  px = batch["pixel_values"].reshape((-1,) + batch["pixel_values"].shape[2:])[real_i]
  layout = None
  if cfg.anyres:
    layout = tuple(
        batch[k].reshape((-1,) + batch[k].shape[2:])[real_i] for k in ("image_index", "image_weight", "image_tokens")
    )
  logits = Llava(cfg).apply(
      {"params": params},
      batch["input_ids"],
      px,
      batch["attention_mask"],
      image_layout=layout,
      pixel_values_videos=batch["pixel_values_videos"].reshape((-1, F, SIZE, SIZE, 3))[real_v],
  )
  nll, w, _ = step_lib.token_loss(logits, batch["labels"], batch["attention_mask"])
  np.testing.assert_allclose(float(loss), float((nll * w).sum() / w.sum()), rtol=1e-6)


def test_bad_videos_are_counted_and_named(data, tmp_path, caplog):
  tok, records, clips, _ = data
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
  short = data_video.write_video(tmp_path / "short.mkv", np.zeros((2, 16, 16, 3), np.uint8))
  turn = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}]
  bad = [
      {"id": "corrupt", "videos": [str(corrupt)], "conversations": turn},
      {"id": "missing", "videos": [str(tmp_path / "nothere.mp4")], "conversations": turn},
      {"id": "too-short", "videos": [short], "conversations": turn},
      {"id": "both-keys", "video": clips[0], "videos": [clips[0]], "conversations": turn},
      {"id": "two-videos", "videos": clips, "conversations": [{"from": "human", "value": "<video><video>"}] + turn[1:]},
  ]
  cfg = _cfg(tok, "average")
  it = P.make_dataset(records[:1] + bad, _one_pass(_spec(tok, cfg), 6, drop_remainder=False))
  assert [i for b in it for i in b["ids"] if i] == ["ours"]
  counts = it.counts()
  assert (counts["bad_video"], counts["bad_record"], counts["image_count_mismatch"]) == (3, 1, 1)
  for sid, text in [("corrupt", "corrupt.mp4"), ("missing", "nothere.mp4"), ("too-short", "short.mkv")]:
    assert f"'{sid}' rejected (bad_video)" in caplog.text and text in caplog.text
  assert "more than the max_videos=1" in caplog.text
  with pytest.raises(ValueError, match=r"'corrupt'.*bad_video.*corrupt\.mp4"):
    list(P.make_dataset(bad, _one_pass(_spec(tok, cfg), 1, policy="raise")))
  # A run that takes no videos refuses them by name rather than dropping the frames.
  none = P.ExampleSpec.for_model(
      cfg, tokenizer=tok, template="vicuna_v1", image_config=image_config_for("clip", SIZE), max_len=256, max_images=1
  )
  result = P.prepare_example(records[0], none)
  assert result.reason.value == "image_count_mismatch" and "data.video_frames=0" in result.detail


def test_packed_rows_keep_each_video_with_its_placeholders(data):
  tok, records, _, _ = data
  cfg = _cfg(tok, "average")
  spec = _spec(tok, cfg, max_videos=2)
  it = P.make_dataset(records, _one_pass(spec, 2, pack=True, num_epochs=None))
  n_video = video.num_video_tokens(cfg, F)
  for _ in range(3):
    b = next(it)
    assert b["pixel_values_videos"].shape == (2, 2, F, SIZE, SIZE, 3)
    for row in range(2):
      assert (b["input_ids"][row] == cfg.video_token_id).sum() == n_video * b["video_mask"][row].sum()
      assert not b["pixel_values_videos"][row][~b["video_mask"][row]].any()
