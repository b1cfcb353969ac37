"""Answer a LLaVA-format question file with a model, resumably, then score it.

    metrics = run_eval(load_model(ckpt), "out/", task="gqa", questions="q.jsonl",
                       annotations="a.json", image_root="images/")

Steps: read the questions (``eval.questions.read_questions``), skip the ids already in
``OUT/<task>_answers.jsonl`` (a killed run resumes where it stopped), build each prompt
from the question text + the task's suffix in the model's conversation template (the
image tag first, as LLaVA's ``model_vqa_loader``), generate in left-padded batches of
fixed shape (greedy by default), append each answer as soon as its batch is done, and
score everything with ``eval.tasks.score`` into ``OUT/eval.json``.

Several images per question (LLaVA-Interleave style: ``"image": ["a.jpg", "b.jpg"]``):
the text keeps one ``<image>`` tag per image where it puts them (the template decides
whether they move; "NAME@inline" keeps them), or has none and they all go first; every
row then has M image slots, M the most images of any question in the file.

A video question (``"video": "clip.mp4"``, one per question) is sampled to ``video_frames``
frames (``data.video.sample_frames``; the same F for every question, so shapes stay
fixed) and goes where its text's ``<video>`` tag is, else first. A model with a video
token (OneVision, NeXT-Video) gets float32[B, 1, F, S, S, 3] videos with a ``video_mask``;
any other model the frames as images (``infer.media``), which the image slots count.

A question whose image or video is missing or cannot be decoded is not a crash: it gets an answer
row with empty text and ``metadata.error`` (so it scores as wrong and is not retried),
and the count is reported as ``<task>/errors``.

Shapes stay fixed so each (batch, length bucket) compiles once: the last batch is padded
with dummy rows, prompts are left-padded to a multiple of ``length_bucket``, and every row
has M image slots (one for single-image tasks; ``image_mask`` False where unused).

Any-resolution checkpoints (LLaVA-NeXT, OneVision: ``model.cfg.anyres``): each image is
``cfg.tiles_per_image`` tiles (zero tiles after its own), so the pixels are float32[B,
M, P, S, S, 3] whatever the sizes; each image's placeholder count follows its size
(``LoadedModel.encode_prompt``), within the config's fixed ``image_token_budget``, and
``generate`` builds the packing layout from the batch's int32[B, M, 2] image sizes.

Several processes (``jax.distributed``, the model on a mesh spanning them: ``load_model(...,
mesh=)``): every process calls ``run_eval`` with the same arguments and must see the same
question and image files. Process 0 alone reads and appends the answer file and writes
eval.json (other hosts may not see its disk): it decides which questions are still to
do and broadcasts their indices, then every process prepares the same full batches (so
each batch's shape, hence the sequence of compiled calls, is the same everywhere and
does not depend on the number of processes), the batch enters ``generate`` as a global
array and the tokens come back replicated. The returned metrics are broadcast from
process 0, so every process returns the same dict.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llava_jax import distributed
from llava_jax import storage
from llava_jax.data.images import load_image
from llava_jax.data.templates import IMAGE_TAG, VIDEO_TAG
from llava_jax.eval.answers import AnswerWriter, answered_ids, read_answers
from llava_jax.eval.questions import read_annotations, read_questions
from llava_jax.eval.tasks import get_task, prompt_text, score
from llava_jax.infer import media

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prepared:
  """One question ready to batch: prompt ids int32[T] and pixels float32[K, S, S, 3] | None
  (its K images in order; anyres: tiles float32[K, P, S, S, 3] and ``image_sizes``
  int32[K, 2], the images' (height, width))."""

  question: dict
  prompt: str
  ids: np.ndarray
  pixels: np.ndarray | None
  image_sizes: np.ndarray | None = None
  videos: np.ndarray | None = None  # float32[1, F, S, S, 3]: video configs' video


def answers_path(workdir: str | os.PathLike, task: str) -> Path:
  """``workdir/<task>_answers.jsonl`` (a pathlib.Path, or an epath.Path on a bucket)."""
  return storage.as_path(storage.join(workdir, f"{task}_answers.jsonl"), "--workdir")


def _image_names(question: dict) -> list:
  """The question's images: a name, a list of names (several images), or base64 bytes."""
  if question.get("image_base64"):
    return [base64.b64decode(question["image_base64"])]
  names = question.get("image")
  if not names:
    return []
  return list(names) if isinstance(names, (list, tuple)) else [names]


def _image_source(name, image_root: str | None):
  if isinstance(name, bytes) or not image_root or os.path.isabs(name) or storage.is_remote(name):
    return name
  return storage.join(image_root, name)


def _video_names(question: dict) -> list:
  name = question.get("video")
  return [name] if name else []


def max_images(questions: Sequence[dict], frames_per_video: int = 0) -> int:
  """Image slots per row: the most images of any question (at least 1), a video counting
  ``frames_per_video`` (a model that takes a video as its frames)."""
  return max([1] + [len(_image_names(q)) + frames_per_video * len(_video_names(q)) for q in questions])


def prepare(model, question: dict, task: str, image_root: str | None, video_frames: int = 8) -> Prepared:
  """Question row -> Prepared. Raises ValueError naming the question if an image or its
  video fails or its ``<image>`` / ``<video>`` tags do not match them."""
  names = _image_names(question)
  qid = question["question_id"]
  videos = []
  for name in _video_names(question):
    try:
      videos += media.load_videos(_image_source(name, image_root), num_frames=video_frames)
    except (ValueError, OSError) as e:
      raise ValueError(f"question {qid!r} (video): {e}") from e
  images = []
  for k, name in enumerate(names):
    try:
      images.append(load_image(_image_source(name, image_root)))
    except (ValueError, OSError) as e:
      which = f" (image {k + 1} of {len(names)})" if len(names) > 1 else ""
      raise ValueError(f"question {qid!r}{which}: {e}") from e
  text = prompt_text(question, task)
  tags = text.count(IMAGE_TAG)
  if len(images) > 1 and tags:  # interleaved: the tags say where each image goes
    if tags != len(images):
      raise ValueError(f"question {qid!r}: {tags} {IMAGE_TAG} tags for {len(images)} images")
  else:  # LLaVA's model_vqa_loader: the image(s) first
    text = f"{IMAGE_TAG}\n" * len(images) + text.replace(IMAGE_TAG, "").strip()
  if videos and text.count(VIDEO_TAG) != 1:  # no tag (or several): the video first
    text = f"{VIDEO_TAG}\n" + text.replace(VIDEO_TAG, "").strip()
  conversation = [{"from": "human", "value": text}]
  try:  # LoadedModel.preprocess_media: tiles and (height, width) for anyres models; frames
    pixels, image_sizes, pixel_values_videos, frames = model.preprocess_media(conversation, images, videos)
    prompt, ids = model.encode_prompt(conversation, image_sizes, frames)
  except ValueError as e:
    raise ValueError(f"question {qid!r}: {e}") from e
  return Prepared(question, prompt, ids, pixels, image_sizes, pixel_values_videos)


def make_batch(
    items: Sequence[Prepared],
    batch_size: int,
    length_bucket: int,
    image_size: int,
    pad_id: int,
    slots: int = 1,
    tiles: int | None = None,
    video_frames: int | None = None,
):
  """Left-padded fixed-shape arrays for ``sampler.generate``.

  Args: ``tiles``: anyres models: P, the tiles per image (``cfg.tiles_per_image``);
    ``video_frames``: F, for one video slot per row (video configs), else None.
  Returns: ids int32[batch_size, T] (T a multiple of ``length_bucket``), mask int32[same],
    pixels float32[batch_size, M, S, S, 3] (anyres: [batch_size, M, P, S, S, 3]),
    image_mask bool[batch_size, M] (M = slots), image_sizes int32[batch_size, M, 2]
    (anyres; else None), videos float32[batch_size, 1, F, S, S, 3] and video_mask
    bool[batch_size, 1] (or None, None); rows beyond ``len(items)`` are dummies (one pad
    token).
  """
  longest = max(len(p.ids) for p in items)
  t = -(-longest // length_bucket) * length_bucket
  ids = np.full((batch_size, t), pad_id, np.int32)
  mask = np.zeros((batch_size, t), np.int32)
  mask[:, -1] = 1  # dummy rows: a single pad token, so no row is empty
  per_image = (image_size, image_size, 3) if tiles is None else (tiles, image_size, image_size, 3)
  pixels = np.zeros((batch_size, slots) + per_image, np.float32)
  image_mask = np.zeros((batch_size, slots), bool)
  image_sizes = None if tiles is None else np.zeros((batch_size, slots, 2), np.int32)  # empty slots: ignored
  videos = video_mask = None
  if video_frames is not None:
    videos = np.zeros((batch_size, 1, video_frames, image_size, image_size, 3), np.float32)
    video_mask = np.zeros((batch_size, 1), bool)
  for r, p in enumerate(items):
    ids[r, t - len(p.ids) :], mask[r, t - len(p.ids) :] = p.ids, 1
    if p.pixels is not None:
      k = len(p.pixels)
      pixels[r, :k], image_mask[r, :k] = p.pixels, True
      if image_sizes is not None:
        image_sizes[r, :k] = p.image_sizes
    if p.videos is not None:
      videos[r], video_mask[r] = p.videos, True
  return ids, mask, pixels, image_mask, image_sizes, videos, video_mask


def _todo(asked: Sequence[dict], out: Path) -> list[int]:
  """Indices into ``asked`` of the questions without an answer in ``out``, as process 0
  sees the file, on every process."""
  import jax

  counts = distributed.gather_json(len(asked))
  if len(set(counts)) > 1:
    raise ValueError(
        f"the processes read different numbers of questions {counts} (in "
        "process order); every process needs the same question file"
    )
  todo = None
  if jax.process_index() == 0:
    done = {str(i) for i in answered_ids(out)}
    todo = [i for i, q in enumerate(asked) if str(q["question_id"]) not in done]
  return distributed.gather_json(todo)[0]  # process 0's view


def _check_same_batch(ready: Sequence[Prepared], batch: Sequence[dict]) -> None:
  """Several processes: the same questions of ``batch`` prepared everywhere, else their
  generate calls would differ in shape and hang; raises (on every process) naming them."""
  import jax

  if jax.process_count() == 1:
    return
  prepared = distributed.gather_json([str(p.question["question_id"]) for p in ready])
  if any(ids != prepared[0] for ids in prepared):
    raise ValueError(
        f"questions {[q['question_id'] for q in batch]}: the processes could "
        f"load the images of different ones (prepared, in process order: "
        f"{prepared}); every process needs the same image files"
    )


def run_eval(
    model,
    workdir: str | os.PathLike,
    *,
    task: str,
    questions: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    image_root: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    length_bucket: int = 64,
    model_id: str | None = None,
    mesh=None,
    progress: bool = True,
    video_frames: int = 8,
) -> dict[str, Any]:
  """Answers the (first ``limit``) questions not yet answered, then scores all of them.

  Args:
    model: a ``llava_jax.infer.loading.LoadedModel``.
    workdir: output directory (``<task>_answers.jsonl``, ``eval.json``).
    task: a key of ``eval.tasks.TASKS`` (prompt suffix and metric).
    questions / annotations: files as ``read_questions`` / ``read_annotations`` take them;
      without annotations nothing is scored (eval.json still records counts).
    image_root: directory the questions' relative ``image`` paths are under (default:
      the questions file's directory).
    mesh: the mesh the params are on (default ``model.mesh``); None runs unsharded.
    video_frames: frames sampled from each question's ``video``.
  Returns:
    the dict written to ``eval.json``: ``{"step", "<task>/<metric>": …, "<task>/errors"}``
    (on every process; only process 0 writes files).
  """
  import jax
  from tqdm import tqdm

  from llava_jax.infer.sampler import generate

  get_task(task)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  mesh = mesh if mesh is not None else getattr(model, "mesh", None)
  primary = jax.process_index() == 0
  storage.check(workdir, "--workdir", write=True)
  workdir = storage.as_path(workdir, "--workdir")
  if primary:
    storage.makedirs(workdir)
  image_root = image_root if image_root is not None else os.path.dirname(os.fspath(questions))
  asked = read_questions(questions)
  if limit is not None:
    asked = asked[:limit]
  out = answers_path(workdir, task)
  todo = [asked[i] for i in _todo(asked, out)]
  # Slots of the whole file, so a resumed run compiles the same shapes.
  video_config = model.cfg.video_token_id is not None
  slots = max_images(asked, 0 if video_config else video_frames)
  video_slots = video_frames if video_config and any(_video_names(q) for q in asked) else None
  log.info("%s: %d questions, %d already answered, %d to go", task, len(asked), len(asked) - len(todo), len(todo))
  stops = model.stop_token_ids()
  rng = jax.random.key(seed)
  writing = AnswerWriter(out, model_id or "llava_jax") if primary else None
  with (
      writing or contextlib.nullcontext() as writer,
      tqdm(total=len(todo), desc=task, unit="q", disable=not (progress and primary)) as bar,
  ):
    for start in range(0, len(todo), batch_size):
      ready = []
      for q in todo[start : start + batch_size]:
        try:
          ready.append(prepare(model, q, task, image_root, video_frames))
        except ValueError as e:
          if writer is not None:
            log.warning("%s", e)
            writer.write(q["question_id"], q["text"], "", {"error": str(e)})
          bar.update(1)
      _check_same_batch(ready, todo[start : start + batch_size])
      if not ready:
        continue
      tiles = model.cfg.tiles_per_image if model.cfg.anyres else None
      ids, mask, pixels, image_mask, image_sizes, videos, video_mask = make_batch(
          ready,
          batch_size,
          length_bucket,
          model.cfg.vision.image_size,
          model.tokenizer.pad_id,
          slots,
          tiles,
          video_slots,
      )
      tokens = generate(
          model.cfg,
          model.params,
          ids,
          pixels,
          mask,
          image_mask=image_mask,
          image_sizes=image_sizes,
          pixel_values_videos=videos,
          video_mask=video_mask,
          max_new_tokens=max_new_tokens,
          temperature=temperature,
          eos_token_id=None,
          stop_token_ids=stops,
          rng=jax.random.fold_in(rng, start),
          mesh=mesh,
          rules=getattr(model, "rules", None),
      )
      tokens = np.asarray(tokens)  # replicated with a mesh: every process has all rows
      for r, p in enumerate(ready):
        if writer is not None:
          extra = {k: p.question[k] for k in ("round_id", "options") if k in p.question}
          writer.write(
              p.question["question_id"],
              p.question["text"],
              model.decode_answer(tokens[r]),
              {"prompt": p.prompt},
              **extra,
          )
        bar.update(1)
      if writer is not None:
        writer.flush()  # on a bucket: this batch's answers, published as one append
  result = None
  if primary:
    result = write_eval_json(workdir, task, out, asked, annotations, model.step)
  return distributed.gather_json(result)[0]


def write_eval_json(
    workdir: Path, task: str, answers: Path, asked: Sequence[dict], annotations, step
) -> dict[str, Any]:
  """Scores the answers to ``asked`` (others in the file are ignored) into eval.json."""
  ids = {str(q["question_id"]) for q in asked}
  rows = [r for r in read_answers(answers) if str(r["question_id"]) in ids]
  result: dict[str, Any] = {"step": step}
  if annotations is not None:
    ann = read_annotations(task, annotations, questions=asked)
    ann = {k: v for k, v in ann.items() if str(k) in ids}
    result.update(score(task, rows, ann))
  result[f"{task}/answered"] = len({str(r["question_id"]) for r in rows})
  result[f"{task}/errors"] = sum(bool(r.get("metadata", {}).get("error")) for r in rows)
  storage.write_json(result, storage.join(workdir, "eval.json"), indent=1)
  return result
