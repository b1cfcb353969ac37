"""Video decoding and frame sampling (llava_jax.data.video) against transformers' sampling
and its PyAV reader, on small real videos written here with PyAV."""

import av
import numpy as np
import pytest
from transformers import video_utils

from llava_jax.data import video

FRAMES, W, H, RATE = 24, 64, 48, 12


def _circle(i: int) -> np.ndarray:
  """Frame i: a white disc of radius 6 whose centre moves 2 px right per frame."""
  y, x = np.mgrid[:H, :W]
  img = np.zeros((H, W, 3), np.uint8)
  img[(x - (8 + 2 * i)) ** 2 + (y - 24) ** 2 <= 36] = 255
  img[..., 2] = 40  # a colour plane the codec must keep
  return img


def _centre_x(frame: np.ndarray) -> float:
  w = frame[..., 0].astype(np.float64)
  return float((w * np.arange(W)).sum() / w.sum())


def _write(path, codec, pix_fmt="yuv420p", fmt=None, options=None, container_options=None, n=FRAMES):
  with av.open(str(path), "w", format=fmt, options=container_options or {}) as c:
    s = c.add_stream(codec, rate=RATE)
    s.width, s.height, s.pix_fmt = W, H, pix_fmt
    s.options = options or {}
    for i in range(n):
      for p in s.encode(av.VideoFrame.from_ndarray(_circle(i), format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return str(path)


CODECS = {  # name: (codec, pixel format, file suffix, lossless)
    "h264": ("libx264", "yuv420p", ".mp4", False),
    "mpeg4": ("mpeg4", "yuv420p", ".mp4", False),
    "vp9": ("libvpx-vp9", "yuv420p", ".webm", False),
    "ffv1": ("ffv1", "bgr0", ".mkv", True),  # RGB: bit-exact
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  return {k: _write(d / f"circle_{k}{suffix}", codec, pix) for k, (codec, pix, suffix, _) in CODECS.items()}


@pytest.mark.parametrize("total,num_frames", [(24, 8), (24, 24), (24, 1), (24, 5), (7, 3), (100, 32), (9, 9)])
def test_indices_equal_transformers_by_count(total, num_frames):
  meta = video_utils.VideoMetadata(total_num_frames=total, fps=12.0)
  ref = video_utils.default_sample_indices_fn(meta, num_frames=num_frames)
  np.testing.assert_array_equal(video.frame_indices(total, 12.0, num_frames=num_frames), ref)


@pytest.mark.parametrize(
    "total,video_fps,fps", [(24, 12.0, 1), (24, 12.0, 2.5), (300, 29.97, 1), (5, 30.0, 1), (24, 12, 12)]
)
def test_indices_equal_transformers_by_fps(total, video_fps, fps):
  meta = video_utils.VideoMetadata(total_num_frames=total, fps=video_fps)
  ref = video_utils.default_sample_indices_fn(meta, fps=fps)
  np.testing.assert_array_equal(video.frame_indices(total, video_fps, fps=fps), ref)


def test_indices_errors():
  with pytest.raises(ValueError, match="9 frames asked for, but the video has only 8"):
    video.frame_indices(8, 12.0, num_frames=9)
  with pytest.raises(ValueError, match="exclusive"):
    video.frame_indices(8, 12.0, num_frames=2, fps=1)
  with pytest.raises(ValueError, match="frame rate, which is unknown"):
    video.frame_indices(8, 0.0, fps=1)
  np.testing.assert_array_equal(video.frame_indices(5), np.arange(5))


@pytest.mark.parametrize("name", list(CODECS))
def test_frames_are_the_sampled_ones(videos, name):
  """Each returned frame shows the disc where frame ``indices[k]`` put it (a neighbour is 2 px off)."""
  out = video.sample_frames(videos[name], num_frames=8)
  assert out.frames.dtype == np.uint8 and out.frames.shape == (8, H, W, 3)
  assert out.total_frames == FRAMES and out.video_fps == RATE
  np.testing.assert_array_equal(out.indices, [0, 3, 6, 9, 12, 15, 18, 21])
  np.testing.assert_allclose(out.timestamps, out.indices / RATE, atol=1e-6)
  for frame, i in zip(out.frames, out.indices):
    if CODECS[name][3]:
      np.testing.assert_array_equal(frame, _circle(int(i)))
    else:
      assert abs(_centre_x(frame) - (8 + 2 * i)) < 0.5, (name, i, _centre_x(frame))
      assert np.abs(frame.astype(int) - _circle(int(i))).mean() < 8


def test_fps_sampling_and_bytes(videos):
  path = videos["vp9"]
  out = video.sample_frames(path, fps=1)  # 2 s of video at 1 frame/s
  np.testing.assert_array_equal(out.indices, [0, 12])
  with open(path, "rb") as f:
    again = video.sample_frames(f.read(), fps=1)
  np.testing.assert_array_equal(again.frames, out.frames)
  assert video.sample_frames(path).frames.shape[0] == FRAMES


@pytest.mark.parametrize("name", ["h264", "mpeg4"])
def test_frames_equal_transformers_pyav_reader(videos, name):
  """transformers' ``load_video(backend="pyav")`` (MP4 carries a frame count it can read)."""
  ref, meta = video_utils.load_video(videos[name], num_frames=8, backend="pyav")
  out = video.sample_frames(videos[name], num_frames=8)
  np.testing.assert_array_equal(out.indices, meta.frames_indices)
  np.testing.assert_array_equal(out.frames, ref)


def test_remote_path_reads_through_storage(videos, monkeypatch):
  from llava_jax import storage

  with open(videos["h264"], "rb") as f:
    data = f.read()
  seen = []
  monkeypatch.setattr(storage, "read_bytes", lambda p: seen.append(p) or data)
  out = video.sample_frames("gs://bucket/clip.mp4", num_frames=4)
  assert seen == ["gs://bucket/clip.mp4"] and out.frames.shape == (4, H, W, 3)
  np.testing.assert_array_equal(out.frames, video.sample_frames(videos["h264"], num_frames=4).frames)


def test_bad_files_raise_naming_the_file(videos, tmp_path):
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  garbage = tmp_path / "garbage.webm"
  garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  cases = {str(empty): "cannot open video", str(garbage): "cannot open video"}
  for name in ("h264", "vp9"):
    data = open(videos[name], "rb").read()
    half = tmp_path / f"half_{name}{CODECS[name][2]}"
    half.write_bytes(data[: len(data) // 2])
    # MP4 keeps its index (moov) at the end: half a file does not open; WebM's packets stop early.
    cases[str(half)] = "cannot open video" if name == "h264" else "is truncated: its header says 2.000 s, but"
  for path, message in cases.items():
    with pytest.raises(ValueError, match=f"{message}") as e:
      video.sample_frames(path, num_frames=4)
    assert path in str(e.value)
  with pytest.raises(ValueError, match=r"cannot open video <0 bytes>"):
    video.sample_frames(b"", num_frames=4)
  with pytest.raises(FileNotFoundError):
    video.sample_frames(str(tmp_path / "missing.mp4"), num_frames=4)


def test_truncated_mp4_with_index_first(tmp_path):
  """``faststart`` puts the index first: the header promises 24 frames, the data stops."""
  path = _write(tmp_path / "fast.mp4", "libx264", container_options={"movflags": "faststart"})
  assert video.sample_frames(path, num_frames=4).total_frames == FRAMES
  data = open(path, "rb").read()
  with av.open(path) as c:
    starts = sorted(p.pos for p in c.demux(video=0) if p.size)
  clean, torn = tmp_path / "clean_cut.mp4", tmp_path / "torn.mp4"
  clean.write_bytes(data[: starts[12]])  # 12 whole packets: the demuxer just stops
  torn.write_bytes(data[: starts[12] - 5])  # the 12th packet cut short: the decoder fails
  with pytest.raises(ValueError, match=f"video {clean} is truncated: its header says 24 frames, but decoding stopped"):
    video.sample_frames(str(clean), num_frames=8)
  with pytest.raises(ValueError, match=f"cannot decode video {torn} after .* of 24 frames"):
    video.sample_frames(str(torn), num_frames=8)


def test_too_short_and_no_video_stream(tmp_path):
  short = _write(tmp_path / "short.mkv", "ffv1", "bgr0", n=3)
  with pytest.raises(ValueError, match=f"video {short}: 8 frames asked for, but the video has only 3"):
    video.sample_frames(short, num_frames=8)
  audio = tmp_path / "tone.wav"
  with av.open(str(audio), "w") as c:
    s = c.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for p in s.encode(frame):
      c.mux(p)
  with pytest.raises(ValueError, match=f"video {audio} has no video stream"):
    video.sample_frames(str(audio), num_frames=1)
