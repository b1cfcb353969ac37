"""Video decoding and uniform frame sampling (LLaVA-OneVision / LLaVA-NeXT-Video inputs).

``sample_frames(source, num_frames=8)`` decodes a video file (a local path, a ``gs://``
path read through ``llava_jax.storage``, or the file's bytes) and returns the sampled
frames as uint8[F, H, W, 3] RGB with their frame indices and timestamps. Each frame is
then an image: ``images.preprocess(frame, cfg)`` turns it into the model's float32[S, S, 3].

Sampling is transformers' ``default_sample_indices_fn`` (``video_utils``), which its
video processors use (``do_sample_frames=True``): ``num_frames`` frames at indices
``arange(F) * total // F``, or with ``fps`` (frames per second of video) first
``F = max(1, int(total / video_fps * fps))``. Asking for more frames than the video has
is an error there and here. (The original LLaVA-NeXT repository's
``np.linspace(0, total - 1, F, dtype=int)`` also lands on the last frame; it is not what
the transformers processors, and so the HF checkpoints' reference preprocessing, do.)

Decoder: PyAV (``av``), FFmpeg's Python binding. It is actively maintained (releases
every few months), its wheels bundle FFmpeg (h264, hevc, vp8/vp9, av1 decoders; no system
FFmpeg needed) for Linux x86-64/aarch64, macOS and Windows on current Pythons, and it is
transformers' default video backend (``read_video_pyav``), so the frames decoded here are
the same bytes transformers' ``load_video(..., backend="pyav")`` gives. decord 0.6.0 was
the alternative LLaVA's code used: its last release is from 2021, with no wheels for
Python > 3.10 or for aarch64, and it bundles an old FFmpeg.

Bad inputs never crash silently: an unreadable, empty, truncated or undecodable file,
a file with no video stream, or one with fewer frames than asked for raises ValueError
naming the file and what was wrong (the same contract as ``images.load_image``, which
callers count as a ``bad_image``-style rejection); a missing file raises
FileNotFoundError (an OSError).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import NamedTuple, Union

import numpy as np

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


class VideoFrames(NamedTuple):
  """Sampled frames of one video."""

  frames: np.ndarray  # uint8[F, H, W, 3], RGB
  indices: np.ndarray  # int64[F], decoded-frame indices (presentation order, from 0)
  timestamps: np.ndarray  # float64[F], presentation time of each frame in seconds
  total_frames: int  # frames in the video
  video_fps: float  # the stream's average frame rate


def frame_indices(total_frames: int, video_fps: float | None = None, num_frames: int | None = None, fps=None):
  """int64[F]: which frames to keep (transformers' ``default_sample_indices_fn``).

  Args:
    total_frames: frames in the video.
    video_fps: the video's frame rate (needed with ``fps``).
    num_frames: F, sampled uniformly; or
    fps: frames to keep per second of video (F = max(1, int(total / video_fps * fps))).
      Neither: every frame.
  """
  if num_frames is not None and fps is not None:
    raise ValueError(f"num_frames={num_frames} and fps={fps} are exclusive: pass one")
  if num_frames is None and fps is not None:
    if not video_fps:
      raise ValueError(f"fps={fps} sampling needs the video's frame rate, which is unknown")
    num_frames = max(1, int(total_frames / video_fps * fps))
  if num_frames is None:
    return np.arange(total_frames, dtype=np.int64)
  if num_frames < 1:
    raise ValueError(f"num_frames must be at least 1, got {num_frames}")
  if num_frames > total_frames:
    raise ValueError(f"{num_frames} frames asked for, but the video has only {total_frames}")
  return np.arange(num_frames, dtype=np.int64) * total_frames // num_frames


def _open(fp, name: str):
  import av

  try:
    container = av.open(fp, mode="r")
  except FileNotFoundError:
    raise
  except (av.FFmpegError, OSError, ValueError, EOFError) as e:
    raise ValueError(f"cannot open video {name}: {type(e).__name__}: {e}") from e
  if not container.streams.video:
    container.close()
    raise ValueError(f"video {name} has no video stream")
  return container


def _count_frames(container, name: str) -> tuple[int, float | None]:
  """(frames, end time in seconds of the last packet) by demuxing, for containers
  (WebM, MKV) whose header has no frame count."""
  import av

  stream = container.streams.video[0]
  count, end = 0, None
  try:
    for packet in container.demux(stream):
      if packet.size == 0:  # the flush packet demux yields at the end
        continue
      count += 1
      if packet.pts is not None and packet.time_base is not None:
        t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
        end = t if end is None else max(end, t)
  except av.FFmpegError as e:
    raise ValueError(f"video {name} is corrupt after {count} packets: {type(e).__name__}: {e}") from e
  return count, end


def _stream_info(container, name: str) -> tuple[int, float]:
  """(total frames, average fps); raises ValueError for an empty or truncated stream."""
  stream = container.streams.video[0]
  video_fps = float(stream.average_rate) if stream.average_rate else 0.0
  total = int(stream.frames or 0)  # MP4/MOV headers carry it; WebM/MKV do not
  if total == 0:
    total, end = _count_frames(container, name)
    if stream.duration is not None and stream.time_base is not None:
      duration = float(stream.duration * stream.time_base)
    else:
      duration = None if container.duration is None else container.duration / 1e6  # AV_TIME_BASE
    # A cut-off Matroska file keeps its header's duration; its packets stop early. The
    # slack (10%, two frame periods) covers audio longer than the video and rounding.
    if duration and video_fps and (end or 0.0) < 0.9 * duration - 2 / video_fps:
      found = "it holds no video packets" if end is None else f"the packets end at {end:.3f} s ({total} frames)"
      raise ValueError(f"video {name} is truncated: its header says {duration:.3f} s, but {found}")
  if total == 0:
    raise ValueError(f"video {name} has no frames")
  return total, video_fps


def _read(source: VideoSource) -> tuple[str, object]:
  from llava_jax import storage

  if isinstance(source, (bytes, bytearray, memoryview)):
    data = bytes(source)
    return f"<{len(data)} bytes>", data
  name = os.fspath(source)
  if storage.is_remote(name):
    return name, storage.read_bytes(name)  # one GET; FileNotFoundError if absent
  if not os.path.exists(name):
    raise FileNotFoundError(f"video {name} does not exist")
  return name, name


def sample_frames(source: VideoSource, num_frames: int | None = None, fps: float | None = None) -> VideoFrames:
  """Decodes a video and keeps uniformly sampled frames (see ``frame_indices``).

  Args:
    source: a local or ``gs://`` path, or the encoded file's bytes.
    num_frames: frames to keep, F; or
    fps: frames to keep per second of video; neither: every frame.
  Returns:
    ``VideoFrames`` with frames uint8[F, H, W, 3] (RGB, as decoded, unresized).
  Raises:
    ValueError naming the file: unreadable, empty, truncated, no video stream, or fewer
      frames than ``num_frames``. FileNotFoundError if it does not exist.
  """
  import av

  name, data = _read(source)
  fp = (lambda: io.BytesIO(data)) if isinstance(data, bytes) else (lambda: data)
  with _open(fp(), name) as container:
    total, video_fps = _stream_info(container, name)
  try:
    indices = frame_indices(total, video_fps, num_frames, fps)
  except ValueError as e:
    raise ValueError(f"video {name}: {e}") from e
  wanted = {int(i): k for k, i in enumerate(indices)}
  frames: list = [None] * len(indices)
  times = np.zeros(len(indices), np.float64)
  last, decoded = int(indices[-1]), 0
  with _open(fp(), name) as container:  # a fresh demuxer: counting frames consumed the first
    try:
      for i, frame in enumerate(container.decode(video=0)):
        decoded = i + 1
        if i in wanted:
          k = wanted[i]
          frames[k] = frame.to_ndarray(format="rgb24")
          times[k] = frame.time if frame.time is not None else i / (video_fps or 1.0)
        if i >= last:
          break
    except av.FFmpegError as e:
      raise ValueError(
          f"cannot decode video {name} after {decoded} of {total} frames (truncated or corrupt): {type(e).__name__}: {e}"
      ) from e
  if decoded <= last:
    raise ValueError(
        f"video {name} is truncated: its header says {total} frames, but decoding stopped after {decoded} "
        f"(frame {last} was to be sampled)"
    )
  return VideoFrames(np.stack(frames), indices, times, total, video_fps)


def video_image_config(cfg, image_config):
  """How a video frame is preprocessed: as transformers' video processors do, a plain
  S x S resize for OneVision (bilinear pooling, ``LlavaOnevisionVideoProcessor``), a
  shortest-edge resize and centre crop for NeXT-Video (``LlavaNextVideoVideoProcessor``),
  with the image statistics."""
  mode = "resize" if cfg.video_pooling == "bilinear" else "square"
  return dataclasses.replace(image_config, size=cfg.vision.image_size, mode=mode, crop=True)


def write_video(path, frames: np.ndarray, fps: int = 6, codec: str = "ffv1") -> str:
  """Writes uint8[F, H, W, 3] RGB frames to a video file with PyAV; returns the path.

  ``codec="ffv1"`` (in a ``.mkv``) is lossless, so the decoded frames are the written ones
  (the embedded dataset's clips and the tests); ``"libx264"`` (``.mp4``, yuv420p, even
  sides) is what most real videos are.
  """
  import av

  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise ValueError(f"write_video expects uint8[F, H, W, 3] with F >= 1, got {frames.dtype}{list(frames.shape)}")
  with av.open(os.fspath(path), "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return os.fspath(path)
