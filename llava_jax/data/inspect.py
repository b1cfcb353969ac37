r"""What the model sees: a config's training samples with the tokens that carry loss, rejections and lengths.

    python -m llava_jax.data.inspect --config=configs/tiny_shapes.py:stage2 [--index=N] [--show=2] [--count=1000]

For `--show` samples from `--index` it prints the text exactly as tokenized
(special tokens included), the learned tokens highlighted (green on a
terminal, `[[...]]` otherwise; `--color=always|never`), each image's
placeholders as `<image x576>`, and the sample's token counts. Over the first
`--count` samples (0: all) it prints the rejections per reason
(`tokenize.RejectReason`, with the first sample of each) and the distribution
of token lengths against `data.max_len`, with what padding and first-fit
packing would fill (to choose `max_len` and `data.pack`).

It reads the data as training does (`data.train`, `data.tokenizer`,
`data.template`, `data.max_len`, the model's image tokens; the embedded data
is written first if the config asks for it; videos as `data.video_frames` frames or
a model's video slots; anyres images by their sizes, read from the file headers) but
does not decode images or frames, so `bad_image` and `bad_video` are not counted. First
thing to run on new data.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from llava_jax import storage
from llava_jax.data.tokenize import IGNORE, Rejected, RejectReason, TokenizedSample, tokenize_conversation
from llava_jax.tokenizer import SPIECE_UNDERLINE, SentencePieceTokenizer

_GREEN, _RESET = "\x1b[30;42m", "\x1b[0m"
_OPEN, _CLOSE = "[[", "]]"
_UNBOUNDED = 1 << 30


@dataclasses.dataclass
class Data:
  """What `open_data` reads from a config: the records and how training tokenizes them."""

  source: Any
  tokenizer: Any
  template: str
  image_token_id: int
  num_image_tokens: int
  max_len: int
  video_frames: int = 0  # data.video_frames
  video_token_id: int | None = None  # the model's, with video slots; None: a video is its frames
  num_video_tokens: int = 0
  anyres: Any = None  # the anyres LlavaConfig: image token counts from the images' sizes
  over_budget: str = "reject"

  def tokenize(self, record, max_len: int | None = None) -> TokenizedSample | Rejected:
    """As `data.example.prepare_example` tokenizes `record`, reading image sizes (anyres)
    from the files' headers and never decoding pixels or frames."""
    from llava_jax.data.media_tags import expand_videos_as_images, tag_order, video_tags_from_images
    from llava_jax.data.records import RecordError, image_list, sample_id_of, video_list
    from llava_jax.data.templates import VIDEO_TAG

    sid = sample_id_of(record)
    try:
      images, videos = image_list(record), video_list(record)
    except RecordError as e:
      return Rejected(sid, RejectReason.BAD_RECORD, str(e))
    conversation = record.get("conversations")
    if videos and self.video_frames and isinstance(conversation, list):
      conversation = video_tags_from_images(conversation, len(images), len(videos))
      if self.video_token_id is None:  # the frames become images, in the video's place
        order, media, it_images, it_videos = tag_order(conversation), [], iter(images), iter(videos)
        for tag in order:
          media += (
              [next(it_images, None)] if tag != VIDEO_TAG else [("frame", next(it_videos, None))] * self.video_frames
          )
        conversation, images, videos = (
            expand_videos_as_images(conversation, [self.video_frames] * len(videos)),
            media,
            [],
        )
    counts = self.num_image_tokens
    if self.anyres is not None:
      counts = self._anyres_counts(sid, images)
      if isinstance(counts, Rejected):
        return counts
    return tokenize_conversation(
        {"id": sid, "conversations": conversation, "images": images, "videos": videos},
        self.tokenizer,
        self.template,
        image_token_id=self.image_token_id,
        num_image_tokens=counts,
        max_len=max_len or self.max_len,
        video_token_id=self.video_token_id,
        num_video_tokens=self.num_video_tokens,
    )

  def _anyres_counts(self, sid: str, images: list) -> list[int] | Rejected:
    """Each image's packed token count from its size (file header; a video frame: the
    stream's size), under the slot budget and `over_budget`, as `anyres_example` counts it."""
    from llava_jax.data import anyres_example
    from llava_jax.models.anyres import num_image_tokens, square_images

    square, counts = square_images(self.anyres, len(images)), []
    for k, image in enumerate(images):
      try:
        size = _media_size(image)
      except (ValueError, OSError) as e:
        reason = RejectReason.BAD_VIDEO if isinstance(image, tuple) else RejectReason.BAD_IMAGE
        return Rejected(sid, reason, f"image {k} of {len(images)}: {e}")
      if not square:  # the pipeline's own rule (a square tile always fits)
        size, _, error = anyres_example.fit_size(size, self.anyres, self.over_budget)
        if error is not None:
          return Rejected(sid, RejectReason.IMAGE_OVER_BUDGET, f"image {k} of {len(images)}, {error}")
      counts.append(num_image_tokens(size, self.anyres, square))
    return counts


def _media_size(image) -> tuple[int, int]:
  """(height, width) of an image file or bytes from its header; ("frame", video): the video stream's."""
  import io

  if isinstance(image, tuple):
    import av

    source = image[1]
    with av.open(io.BytesIO(storage.read_bytes(source)) if storage.is_remote(source) else source) as c:
      stream = c.streams.video[0]
      return stream.height, stream.width
  from PIL import Image

  if image is None:
    raise ValueError("missing (None)")
  fp = io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image
  if isinstance(fp, str) and storage.is_remote(fp):
    fp = io.BytesIO(storage.read_bytes(fp))
  with Image.open(fp) as img:
    return img.size[1], img.size[0]


def open_data(config, split: str = "train") -> Data:
  """The config's data source (`data.train` or `data.val`), tokenizer, template and lengths, as training reads them."""
  from llava_jax.data import sources
  from llava_jax.tokenizer import load_tokenizer
  from llava_jax.train import run_config
  from llava_jax.train.setup import model_config

  config = run_config.parse(config)
  d = config.data
  syn = d.synthetic
  if syn and not storage.exists(storage.join(syn["dir"], "tokenizer.model")):
    from llava_jax.data.synthetic import write_synthetic  # as train.loop.prepare_synthetic, one process

    write_synthetic(syn["dir"], **{k: v for k, v in syn.items() if k != "dir"})
  path = getattr(d, split)
  if not path:
    raise ValueError(f"config has no data.{split}")
  tokenizer = load_tokenizer(d.tokenizer, template=d.template)
  cfg = model_config(config, tokenizer)
  video = cfg.video_token_id is not None and d.max_videos > 0 and d.video_frames > 0
  if video:
    from llava_jax.models.video import num_video_tokens
  return Data(
      sources.open_source(path, image_root=d.image_root),
      tokenizer,
      d.template,
      cfg.image_token_id,
      cfg.num_image_tokens,
      d.max_len,
      video_frames=d.video_frames,
      video_token_id=cfg.video_token_id if video else None,
      num_video_tokens=num_video_tokens(cfg, d.video_frames) if video else 0,
      anyres=cfg if cfg.anyres else None,
      over_budget=d.over_budget,
  )


def _runs(flags: Sequence[Any]) -> list[tuple[int, int, Any]]:
  """[(start, end, flag)] of the maximal runs of equal consecutive flags."""
  out, start = [], 0
  for i in range(1, len(flags) + 1):
    if i == len(flags) or flags[i] != flags[start]:
      out.append((start, i, flags[start]))
      start = i
  return out


def _raw_text(tokenizer, ids: Sequence[int]) -> str:
  """The text of ids as the model reads it: for sentencepiece every "▁" (the dummy prefix too) is a space,
  so `legacy` shows ("</s> USER" vs "</s>USER"); other tokenizers decode with special tokens kept."""
  if not isinstance(tokenizer, SentencePieceTokenizer):
    return tokenizer.decode(ids, skip_special_tokens=False)
  out, raw = [], bytearray()
  for i in ids:
    piece = tokenizer.id_to_token(i)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
      raw.append(int(piece[3:5], 16))
      continue
    if raw:
      out.append(raw.decode("utf-8", errors="replace"))
      raw = bytearray()
    out.append(piece.replace(SPIECE_UNDERLINE, " "))
  if raw:
    out.append(raw.decode("utf-8", errors="replace"))
  return "".join(out)


def token_pieces(
    ids: Sequence[int], labels: Sequence[int], tokenizer, image_token_id: int, video_token_id: int | None = None
) -> list[tuple[str, bool]]:
  """int32[L] ids and labels -> [(text, learned)], image / video placeholder runs as
  "<image xN>" / "<video xN>".

  Text is decoded per stretch between images (special tokens kept), and each
  learned / not learned run within a stretch is the difference of decoded
  prefixes, so spaces and multi-byte characters come out as the model reads them.
  """
  ids, labels = [int(i) for i in ids], [int(l) for l in labels]
  kind = {image_token_id: "image"} | ({video_token_id: "video"} if video_token_id is not None else {})
  out = []
  for s, e, media in _runs([kind.get(i) for i in ids]):
    if media:
      out.append((f"<{media} x{e - s}>", False))
      continue
    decoded = lambda j: _raw_text(tokenizer, ids[s:j])
    prev = ""
    for rs, re_, learned in _runs([labels[k] != IGNORE for k in range(s, e)]):
      upto = decoded(s + re_)
      text = upto[len(prev) :] if upto.startswith(prev) else _raw_text(tokenizer, ids[s + rs : s + re_])
      out.append((text, learned))
      prev = upto
  return out


def highlight(pieces: Sequence[tuple[str, bool]], color: bool) -> str:
  """Learned text in green (`color`) or between `[[` and `]]`."""
  mark = (
      (lambda t: _GREEN + t.replace("\n", _RESET + "\n" + _GREEN) + _RESET) if color else (lambda t: _OPEN + t + _CLOSE)
  )
  return "".join(mark(t) if learned and t else t for t, learned in pieces)


def describe_sample(result: TokenizedSample | Rejected, data: Data, color: bool, index: int | None = None) -> str:
  """One sample as the model sees it, or why it is rejected."""
  where = f" (record {index})" if index is not None else ""
  if isinstance(result, Rejected):
    return f"sample {result.sample_id!r}{where} rejected ({result.reason.value}): {result.detail}"
  n_image = int((result.input_ids == data.image_token_id).sum())
  n_video = 0 if data.video_token_id is None else int((result.input_ids == data.video_token_id).sum())
  head = (
      f"sample {result.sample_id!r}{where}: {len(result.input_ids)} tokens ({n_image} image, "
      + (f"{n_video} video, " if n_video else "")
      + f"{result.num_target_tokens} learned), {result.num_images} image(s)"
      + (f", truncated to max_len {data.max_len}" if result.truncated else "")
  )
  body = highlight(
      token_pieces(result.input_ids, result.labels, data.tokenizer, data.image_token_id, data.video_token_id), color
  )
  return head + "\n" + body


@dataclasses.dataclass
class Survey:
  """Counts over the first samples: accepted, rejected per reason (with the first of each), full token lengths."""

  n: int
  accepted: int
  rejected: dict[str, int]
  first: dict[str, Rejected]
  lengths: np.ndarray  # int64[M]: each sample's length before truncation (every sample that tokenizes)


def survey(data: Data, count: int, progress: Callable[[int], None] | None = None) -> Survey:
  """Tokenizes the first `count` records (0: all) as training would."""
  n = len(data.source) if count <= 0 else min(count, len(data.source))
  rejected, first, lengths, accepted = {}, {}, [], 0
  for i in range(n):
    record = data.source[i]
    if record.get("error"):  # the source could not read it (sources.bad_record)
      r = Rejected(str(record.get("id")), RejectReason.BAD_RECORD, str(record["error"]))
    else:
      r = data.tokenize(record)
    if isinstance(r, Rejected):
      rejected[r.reason.value] = rejected.get(r.reason.value, 0) + 1
      first.setdefault(r.reason.value, r)
    else:
      accepted += 1
    if isinstance(r, TokenizedSample) and not r.truncated:
      lengths.append(len(r.input_ids))
    elif isinstance(r, TokenizedSample) or r.reason in (RejectReason.TRUNCATED_IMAGE, RejectReason.TRUNCATED_NO_TARGET):
      full = data.tokenize(record, max_len=_UNBOUNDED)
      if isinstance(full, TokenizedSample):
        lengths.append(len(full.input_ids))
    if progress is not None:
      progress(i)
  return Survey(n, accepted, rejected, first, np.asarray(lengths, np.int64))


def first_fit_rows(lengths: Sequence[int], max_len: int) -> int:
  """Rows that first-fit packing in data order needs (samples longer than max_len are left out)."""
  free: list[int] = []
  for n in lengths:
    if n > max_len:
      continue
    for k, f in enumerate(free):
      if f >= n:
        free[k] -= n
        break
    else:
      free.append(max_len - n)
  return len(free)


def format_survey(s: Survey, max_len: int, width: int = 40) -> str:
  """Rejections per reason and the length distribution as text."""
  lines = [f"first {s.n} samples: {s.accepted} trained on, {s.n - s.accepted} rejected"]
  for reason in RejectReason:
    k = s.rejected.get(reason.value, 0)
    if k:
      ex = s.first[reason.value]
      lines.append(f"  {reason.value:<22}{k:>7}   e.g. {ex.sample_id!r}: {ex.detail[:140]}")
  if not len(s.lengths):
    return "\n".join(lines + ["no sample tokenizes: no lengths"])
  x = s.lengths
  q = np.percentile(x, [50, 90, 99]).astype(int)
  lines.append(
      f"token lengths (images included), {len(x)} samples: min {x.min()}  median {q[0]}  p90 {q[1]}  "
      f"p99 {q[2]}  max {x.max()}  mean {x.mean():.0f}"
  )
  top = max(int(x.max()), max_len)
  edges = np.unique(np.linspace(int(x.min()), top + 1, 11).astype(int))
  hist, _ = np.histogram(x, bins=edges)
  for lo, hi, c in zip(edges[:-1], edges[1:], hist):
    bar = "#" * int(round(width * c / max(hist.max(), 1)))
    cut = "  > max_len" if lo >= max_len else ""
    lines.append(f"  {lo:>6}-{hi:<6} {c:>6} {bar}{cut}")
  over = int((x > max_len).sum())
  fits = x[x <= max_len]
  rows = first_fit_rows(fits, max_len)
  lines.append(
      f"max_len {max_len}: {over} samples ({100 * over / len(x):.1f}%) longer (cut, or rejected if that "
      f"leaves no answer or cuts an image)"
  )
  if len(fits):
    lines.append(
        f"padding to max_len fills {100 * fits.sum() / (len(fits) * max_len):.0f}% of the tokens; "
        f"first-fit packing ({len(fits)} samples in {rows} rows) {100 * fits.sum() / (rows * max_len):.0f}%"
    )
  return "\n".join(lines)


def inspect_config(
    config, *, index: int = 0, show: int = 1, count: int = 1000, color: bool = False, split: str = "train"
) -> str:
  """The whole report `python -m llava_jax.data.inspect` prints."""
  data = open_data(config, split)
  if not 0 <= index < len(data.source):
    raise ValueError(f"--index {index} out of range: {len(data.source)} records in data.{split}")
  t = data.tokenizer
  out = [
      f"data.{split}: {len(data.source)} records; template {data.template!r}; tokenizer {t.name} "
      f"({t.backend}); image: {data.num_image_tokens} tokens of id {data.image_token_id}; "
      f"max_len {data.max_len}; learned tokens {'in green' if color else 'in ' + _OPEN + ' ' + _CLOSE}",
      "",
  ]
  for i in range(index, min(index + show, len(data.source))):
    out += [describe_sample(data.tokenize(data.source[i]), data, color, index=i), ""]
  out.append(format_survey(survey(data, count), data.max_len))
  return "\n".join(out)


def main(argv):
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  color = {"always": True, "never": False}.get(_COLOR.value, sys.stdout.isatty() and os.environ.get("TERM") != "dumb")
  print(
      inspect_config(
          _CONFIG.value, index=_INDEX.value, show=_SHOW.value, count=_COUNT.value, color=color, split=_SPLIT.value
      )
  )


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "config file (get_config(arg)), as for training")
  _INDEX = flags.DEFINE_integer("index", 0, "first record to show")
  _SHOW = flags.DEFINE_integer("show", 1, "records to show from --index")
  _COUNT = flags.DEFINE_integer("count", 1000, "records counted for rejections and lengths (0: all)")
  _COLOR = flags.DEFINE_enum("color", "auto", ["auto", "always", "never"], "highlight learned tokens in colour")
  _SPLIT = flags.DEFINE_enum("split", "train", ["train", "val"], "data.train or data.val")
  flags.mark_flags_as_required(["config"])
  app.run(main)
