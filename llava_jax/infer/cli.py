r"""Chat with a LLaVA checkpoint about an image or a video; text is printed as tokens arrive.

  python -m llava_jax.generate --checkpoint=DIR --image=cat.jpg --prompt="What is this?"
  python -m llava_jax.generate --checkpoint=DIR --image=cat.jpg --interactive
  python -m llava_jax.generate --checkpoint=DIR --image=a.png --image=b.png \
      --prompt="Which image has more circles, <image> or <image>?"
  python -m llava_jax.generate --checkpoint=DIR --video=clip.mp4 --video_frames=8 \
      --prompt="Where does the disc move?"

DIR: a training workdir, a HF LLaVA (also LLaVA-NeXT / OneVision, any resolution) or an
original LLaVA directory (``llava_jax.infer.loading.load_model``). ``--interactive`` keeps the whole conversation
in the template (the image in the first user turn, as LLaVA's ``cli.py``) and answers
each line read from stdin until an empty line or EOF.

Several images (``--image`` repeated, in order): the first message must hold one
``<image>`` tag per image where the conversation puts them (a template "NAME@inline"
keeps them there; LLaVA-1.5's move them to the front of the turn, as it was trained),
or no tag, and then they all go first. One image without a tag goes first by itself.

A video (``--video``, ``--video_frames`` frames sampled uniformly, or ``--video_fps`` per
second): the first message's ``<video>`` tag says where it goes (none: first). A model
with a video token (OneVision, NeXT-Video) sees it as pooled frame tokens; any other
model sees its frames as that many images in its place (``infer.media``). A video that
cannot be read is a usage error naming the file, before anything is compiled.

Several processes (``launch/local_pod.sh N llava_jax.generate ...``, a pod's hosts): the
job is joined first (``llava_jax.distributed``), the params are sharded on a mesh of all
devices (``--mesh``, default ``-1,1,1``) and every process runs the same generation;
only process 0 prints, and with ``--interactive`` only process 0 reads stdin and
broadcasts each line to the others. One process: no mesh unless ``--mesh`` is given.

The command is also ``python -m llava_jax.infer``; the code lives here, beside the package it drives.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Sequence, TextIO

from absl import app, flags

from llava_jax import distributed

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint directory", required=True)
_IMAGE = flags.DEFINE_multi_string(
    "image", [], "image file; repeat for several images, one per <image> tag in order (none: text only)"
)
_VIDEO = flags.DEFINE_string("video", None, "video file for the <video> tag (none: first)")
_VIDEO_FRAMES = flags.DEFINE_integer("video_frames", 8, "frames sampled uniformly from --video")
_VIDEO_FPS = flags.DEFINE_float("video_fps", None, "instead of --video_frames: frames per second of --video")
_PROMPT = flags.DEFINE_string("prompt", None, "the (first) user message")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "multi-turn chat on stdin")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "answer length limit")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", None, "nucleus sampling mass (with temperature > 0)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_TEMPLATE = flags.DEFINE_string("template", None, "override the conversation template")
_STEP = flags.DEFINE_integer("step", None, "training workdirs: checkpoint step")
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "data,fsdp,tensor mesh over all devices (-1: the rest); default: none for one process, -1,1,1 for several",
)


def _held_back(text: str, stop: str) -> int:
  """Length of the longest suffix of ``text`` that could be the start of ``stop``."""
  for k in range(min(len(stop) - 1, len(text)), 0, -1):
    if stop.startswith(text[-k:]):
      return k
  return 0


def stream_answer(
    model,
    conversation: Sequence[dict],
    pixels=None,
    *,
    image_sizes=None,
    pixel_values_videos=None,
    video_frames=None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    out: TextIO = sys.stdout,
) -> str:
  """Generates the next assistant turn, writing its text to ``out`` as it grows.

  Args:
    model: ``LoadedModel``; conversation: turns ending with a user turn.
    pixels: float32[I, S, S, 3], one per ``<image>`` of the conversation in order, or None;
      anyres models: tiles float32[I, P, S, S, 3] and their ``image_sizes`` int32[I, 2]
      (both from ``model.preprocess_images``).
    pixel_values_videos, video_frames: the videos (``model.preprocess_media``), or None.
  Returns: the answer text (as ``model.decode_answer`` gives it).
  """
  import jax

  from llava_jax.infer.sampler import generate_stream

  _, ids = model.encode_prompt(conversation, image_sizes, video_frames)
  stops = model.stop_token_ids()
  stop_text = model.stop_text()
  tokens, printed = [], ""
  steps = generate_stream(
      model.cfg,
      model.params,
      ids[None],
      pixels,
      image_sizes=image_sizes,
      pixel_values_videos=pixel_values_videos,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      rng=jax.random.key(seed),
      stop_token_ids=stops,
      mesh=model.mesh,
      rules=model.rules,
  )
  for step in steps:
    token = int(step[0])
    if token in stops:
      break
    tokens.append(token)
    text = model.decode(tokens)
    finished = bool(stop_text) and stop_text in text
    if finished:
      safe = text[: text.index(stop_text)]
    else:  # hold back a possible partial stop string (e.g. "</" of "</s>")
      safe = text[: len(text) - _held_back(text, stop_text)] if stop_text else text
    if safe.startswith(printed):
      out.write(safe[len(printed) :])
      out.flush()
      printed = safe
    if finished:
      break
  steps.close()
  return model.decode_answer(tokens)


def _native_stdout_to_stderr() -> None:
  """Keeps stdout for the conversation: with several processes on CPU, gloo (C++) logs
  each new connection on fd 1 at any moment, even mid-answer. From here on native writes
  to fd 1 go to stderr, while ``sys.stdout`` keeps the real stdout."""
  sys.stdout.flush()
  real = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(real, "w", buffering=1, encoding=sys.stdout.encoding)


def _read_line(prompt: str) -> str | None:
  """A line of stdin read by process 0 (None at EOF), the same on every process."""
  message = None
  if distributed.is_primary():
    try:
      message = input(prompt)
    except EOFError:
      pass
  return distributed.gather_json(message)[0]


def main(argv):
  del argv
  distributed.initialize()
  import jax

  if jax.process_count() > 1:
    _native_stdout_to_stderr()

  from llava_jax import sharding, storage
  from llava_jax.data.images import load_image
  from llava_jax.data.templates import IMAGE_TAG, VIDEO_TAG
  from llava_jax.infer import media
  from llava_jax.infer.loading import load_model, parse_mesh_shape

  try:  # an unusable path scheme (local and gs:// work): refused before loading anything
    storage.check(_CHECKPOINT.value, "--checkpoint")
    for image in _IMAGE.value:
      storage.check(image, "--image")
    if _VIDEO.value:
      storage.check(_VIDEO.value, "--video")
  except storage.UnsupportedPathError as e:
    raise app.UsageError(str(e)) from e
  if not _INTERACTIVE.value and not _PROMPT.value:
    raise app.UsageError("--prompt is required unless --interactive")
  images = list(_IMAGE.value)
  tags = (_PROMPT.value or "").count(IMAGE_TAG)
  if tags and tags != len(images):
    raise app.UsageError(
        f"--prompt has {tags} {IMAGE_TAG} tag(s) but {len(images)} --image file(s) were given; "
        f"pass one --image per tag (in order), or no tag and the images go first"
    )
  video_tags = (_PROMPT.value or "").count(VIDEO_TAG)
  if video_tags > (1 if _VIDEO.value else 0):
    raise app.UsageError(f"--prompt has {video_tags} {VIDEO_TAG} tag(s) but {int(bool(_VIDEO.value))} --video")
  videos = []
  if _VIDEO.value:  # decoded before loading the model: a bad file fails in seconds
    if _VIDEO_FPS.value is None and _VIDEO_FRAMES.value < 1:
      raise app.UsageError(f"--video_frames must be >= 1, got {_VIDEO_FRAMES.value}")
    try:
      videos = media.load_videos(_VIDEO.value, _VIDEO_FRAMES.value, _VIDEO_FPS.value)
    except (ValueError, OSError) as e:
      raise app.UsageError(f"--video: {e}") from e
  mesh_shape = _MESH.value or ("-1,1,1" if jax.process_count() > 1 else None)
  try:
    mesh = sharding.make_mesh(parse_mesh_shape(mesh_shape)) if mesh_shape else None
  except ValueError as e:
    raise app.UsageError(f"--mesh: {e}") from e
  model = load_model(_CHECKPOINT.value, template=_TEMPLATE.value, step=_STEP.value, mesh=mesh)
  try:
    loaded_images = [load_image(image) for image in images]
  except (ValueError, OSError) as e:
    raise app.UsageError(f"--image: {e}") from e
  inputs = {}

  def preprocess(conversation):
    """The first turn's media (anyres: tiles and sizes; videos: frames or pooled frames)."""
    try:
      pixels, sizes, pixel_values_videos, frames = model.preprocess_media(conversation, loaded_images, videos)
    except ValueError as e:
      raise app.UsageError(f"{'--image / --video' if videos else '--image'}: {e}") from e
    return dict(image_sizes=sizes, pixel_values_videos=pixel_values_videos, video_frames=frames), pixels

  if not (videos and model.cfg.video_token_id is None):  # no frames to place among the images: now
    inputs.update(zip(("media", "pixels"), preprocess([])))

  kwargs = dict(
      max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
  )
  out = sys.stdout if distributed.is_primary() else io.StringIO()
  conversation: list[dict] = []

  def ask(message: str):
    if not conversation and images:
      if IMAGE_TAG not in message:  # the images go first, in order
        message = f"{IMAGE_TAG}\n" * len(images) + message.strip()
      elif message.count(IMAGE_TAG) != len(images):  # --interactive: the first line typed
        raise app.UsageError(f"the first message needs one {IMAGE_TAG} per --image ({len(images)}) or none")
    elif IMAGE_TAG in message:  # the images, if any, belong to the first turn
      if distributed.is_primary():
        print(f"({IMAGE_TAG} ignored: only the first message can show the --image files)", file=sys.stderr)
      message = message.replace(IMAGE_TAG, "").strip()
    if not conversation and videos:
      if VIDEO_TAG not in message:  # the video goes first
        message = f"{VIDEO_TAG}\n" + message.strip()
      elif message.count(VIDEO_TAG) != 1:
        raise app.UsageError(f"the first message needs one {VIDEO_TAG} for --video or none")
    elif VIDEO_TAG in message:
      if distributed.is_primary():
        print(f"({VIDEO_TAG} ignored: only the first message can show the --video file)", file=sys.stderr)
      message = message.replace(VIDEO_TAG, "").strip()
    conversation.append({"from": "human", "value": message})
    if not inputs:
      inputs.update(zip(("media", "pixels"), preprocess(conversation)))
    answer = stream_answer(model, conversation, inputs["pixels"], out=out, **inputs["media"], **kwargs)
    out.write("\n")
    out.flush()
    conversation.append({"from": "gpt", "value": answer})

  if not _INTERACTIVE.value:
    ask(_PROMPT.value)
    return
  first = _PROMPT.value
  while True:
    if first:
      message, first = first, None
      out.write(f"USER: {message}\n")
    else:
      message = _read_line("USER: ")
      if message is None:
        break
    if not message.strip():
      break
    out.write("ASSISTANT: ")
    ask(message)


if __name__ == "__main__":
  app.run(main)
