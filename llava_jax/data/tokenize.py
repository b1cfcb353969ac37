"""A conversation sample -> `input_ids`, `labels` (learned answer tokens only), or an explicit rejection.

    result = tokenize_conversation(sample, tok, "llava_v1", image_token_id=32000,
                                   num_image_tokens=576, max_len=2048)
    sample = apply_policy(result, "skip", counters)   # None if rejected (counted, logged)

`sample` is a LLaVA JSON record: `{"id": ..., "image": "a.jpg" | [...] | absent,
"conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}`.

Labels use the HF convention: `labels[i] = input_ids[i]` where that token is
learned, IGNORE (-100) elsewhere; the loss shifts (predicts `labels[i]` from
positions `< i`). Learned tokens are those of the template's target segments:
each answer with its end separator/token (`" answer</s>"`), as in LLaVA; plus,
for LLaVA-NeXT's templates, every token listed in `Template.learned_tokens`.
An assistant turn with no text is rejected (`empty_answer`): it would teach
only the end token.

How labels are placed. The whole rendered text is tokenized once (that is
`input_ids`). For every boundary between a prompt and a target segment the
text up to the boundary is tokenized too; it must be a prefix of the whole
(the tokens of a prompt are then exactly what `prompt_for_generation` gives at
inference), and its length is where the mask flips. If it is not a prefix, a
token straddles the boundary or the tokenizer is context dependent there, and
the sample is rejected as `template_mismatch` — LLaVA's "tokenization
mismatch" check, made exact, and without its per-tokenizer length patches.
One exception: whitespace that ends an answer after its end token and that
the tokenizer joins to the next turn's first token (llava-hf's Mistral
template: "</s> [INST]" -> '</s>', '▁[') goes with the next turn.
Text is split at each `<image>` tag and the stretches are tokenized separately
(LLaVA's `tokenizer_image_token`); each tag becomes `num_image_tokens` copies
of `image_token_id` (HF convention: one id per image feature), never learned;
any-resolution images (LLaVA-NeXT, OneVision) take a count per image, from their
size (`num_image_tokens=[n_0, n_1, ...]`, `models.anyres.num_image_tokens`).
With `template="hf"` the text is tokenized whole, `<image>` as the tokenizer's
own token, as HF processors do (split as above if the tokenizer has none).

Cost: one encode of the whole text plus one of the stretch (since the last
`<image>`) before each prompt/answer boundary, so roughly (answers + 1) encodes
of half the text: ~15 ms for a 10-round, 2.2k-token conversation on one CPU
core; a few ms for typical LLaVA-Instruct samples.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import TYPE_CHECKING, Mapping, MutableMapping, Sequence

import numpy as np

from llava_jax.data.media_tags import tag_order
from llava_jax.data.records import RecordError, image_list, sample_id_of, video_list
from llava_jax.data.templates import (
    IMAGE_TAG,
    VIDEO_TAG,
    ConversationError,
    Segment,
    Template,
    get_template,
    normalize_conversation,
)

if TYPE_CHECKING:  # annotations only: the train step imports IGNORE from here, and must not
  # need sentencepiece (a bare accelerator machine lacks it; benchmarks/accelerator.py)
  from llava_jax.tokenizer import Tokenizer

IGNORE = -100
_IMAGE = -1  # internal placeholder for one whole image before expansion
_LOG_FIRST = 10  # per reason, then every _LOG_EVERY-th
_LOG_EVERY = 1000

log = logging.getLogger(__name__)


class RejectReason(str, enum.Enum):
  """Why a sample is not trained on (a closed set: counters and dashboards key on these)."""

  TEMPLATE_MISMATCH = "template_mismatch"  # turns don't fit the template, or masks can't be placed exactly
  IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # <image> tags != images given (or text tokenizes to image_token_id)
  TRUNCATED_NO_TARGET = "truncated_no_target"  # max_len cut away every learned token
  TRUNCATED_IMAGE = "truncated_image"  # max_len cut into or past an image's tokens; answers remain
  NO_TARGET = "no_target"  # nothing to learn even before truncation
  BAD_IMAGE = "bad_image"  # reserved for the image loader
  BAD_VIDEO = "bad_video"  # a video that cannot be read, decoded or sampled (data.video)
  BAD_RECORD = "bad_record"  # unreadable (bad UTF-8, cut or invalid JSON) or contradictory ("image" and "images")
  EMPTY_ANSWER = "empty_answer"  # an assistant turn with no text: it would train an end token only
  IMAGE_OVER_BUDGET = "image_over_budget"  # an anyres image needs more tiles/tokens than a slot holds


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
  """A trainable sample.

  Attributes:
    sample_id: the record's id.
    input_ids: int32[L], L <= max_len; image features go where it equals image_token_id.
    labels: int32[L]; input_ids where learned, IGNORE elsewhere; at least one learned.
    num_images: images whose `num_image_tokens` placeholders are all in input_ids.
    truncated: whether the end of the text was cut to fit max_len.
  """

  sample_id: str
  input_ids: np.ndarray
  labels: np.ndarray
  num_images: int
  truncated: bool = False

  @property
  def num_target_tokens(self) -> int:
    return int((self.labels != IGNORE).sum())


@dataclasses.dataclass(frozen=True)
class Rejected:
  """A sample that must not be trained on; `detail` says what was expected and what was found."""

  sample_id: str
  reason: RejectReason
  detail: str

  def __str__(self):
    return f"sample {self.sample_id!r} rejected ({self.reason.value}): {self.detail}"


def _encode_chunks(
    text: str, tokenizer: Tokenizer, add_bos: bool, split_at_images: bool = True
) -> tuple[list[int], list[tuple[int, int, int]]]:
  """Text -> ids with one _IMAGE per tag, and per image-free stretch (char_start, char_end, token_start).

  `split_at_images`: encode each stretch between tags separately (LLaVA's `tokenizer_image_token`); else the
  whole text at once with the tokenizer's own `<image>` token (HF processors; needs the token).
  """
  ids = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
  if not split_at_images:
    image_id = tokenizer.token_to_id(IMAGE_TAG)
    return ids + [_IMAGE if i == image_id else i for i in tokenizer.encode(text)], [(0, len(text), len(ids))]
  chunks, pos = [], 0
  for k, part in enumerate(text.split(IMAGE_TAG)):
    if k:
      ids.append(_IMAGE)
      pos += len(IMAGE_TAG)
    chunks.append((pos, pos + len(part), len(ids)))
    if part:
      ids.extend(tokenizer.encode(part))
    pos += len(part)
  return ids, chunks


def _splits_at_images(template, tokenizer: Tokenizer) -> bool:
  return getattr(template, "split_at_images", True) or tokenizer.token_to_id(IMAGE_TAG) is None


def _token_at_boundary(text: str, b: int, whole: list[int], chunks, tokenizer: Tokenizer) -> tuple[int | None, str]:
  """Index into `whole` where text[:b] ends, or (None, why) if text[:b] does not tokenize to a prefix of `whole`.

  (With one chunk for the whole text, `<image>` is the tokenizer's token: it is `_IMAGE` in `whole`.)
  """
  for cs, ce, ts in chunks:
    if cs <= b <= ce:
      break
  else:  # b inside an <image> tag: segments never split one, but say so rather than guess
    return None, f"boundary at char {b} falls inside an {IMAGE_TAG} tag"
  if b == cs:
    return ts, ""
  part = tokenizer.encode(text[cs:b])
  if len(chunks) == 1 and IMAGE_TAG in text:
    image_id = tokenizer.token_to_id(IMAGE_TAG)
    part = [_IMAGE if i == image_id else i for i in part]
  if whole[ts : ts + len(part)] == part:
    return ts + len(part), ""
  k = next((i for i, (x, y) in enumerate(zip(part, whole[ts:])) if x != y), min(len(part), len(whole) - ts))
  show = lambda ids: [tokenizer.id_to_token(i) if i >= 0 else IMAGE_TAG for i in ids]
  return None, (
      f"at char {b} ({text[max(0, b - 24):b]!r} | {text[b:b + 24]!r}) the prefix tokenizes to "
      f"...{show(part[max(0, k - 2):k + 3])} but the whole text to "
      f"...{show(whole[ts + max(0, k - 2):ts + k + 3])}"
  )


def _merge(segments: Sequence[Segment]) -> list[Segment]:
  out: list[Segment] = []
  for s in segments:
    if out and out[-1].is_target == s.is_target:
      out[-1] = Segment(out[-1].text + s.text, s.is_target)
    else:
      out.append(s)
  return out


def _wants_bos(text: str, tokenizer: Tokenizer, add_bos: bool | None) -> bool:
  """add_bos=None: BOS iff the tokenizer has one and the text does not already start with it (HF chat templates
  write their own, as `apply_chat_template` expects)."""
  if add_bos is not None:
    return add_bos
  return tokenizer.bos_id is not None and not text.startswith(tokenizer.id_to_token(tokenizer.bos_id))


def learned_token_ids(tokenizer: Tokenizer, tokens: Sequence[str]) -> set[int]:
  """Ids of `Template.learned_tokens`: the vocabulary entry, else the single token the string encodes to
  ("\n" is "Ċ" in byte-level vocabularies); strings that are neither are left out, as LLaVA-NeXT's
  `convert_tokens_to_ids` leaves them out."""
  ids = set()
  for t in tokens:
    i = tokenizer.token_to_id(t)
    if i is None:
      enc = tokenizer.encode(t)
      i = enc[0] if len(enc) == 1 else None
    if i is not None and i != tokenizer.unk_id:
      ids.add(i)
  return ids


def tokenize_conversation(
    sample: Mapping,
    tokenizer: Tokenizer,
    template: str | Template,
    *,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    max_len: int,
    add_bos: bool | None = None,
    video_token_id: int | None = None,
    num_video_tokens: int = 0,
) -> TokenizedSample | Rejected:
  """Renders, tokenizes and masks one record (see the module docstring).

  Args:
    sample: LLaVA JSON record with "conversations", optional "id" and "image" or "images"
      (`records.image_list`; both is a `bad_record`).
    tokenizer: a `llava_jax.tokenizer.Tokenizer`.
    template: a Template, a name in `templates.TEMPLATES`, or "hf" (the
      tokenizer's own chat template, `llava_jax.data.chat_template`).
    image_token_id: id written at each image feature position (must not be
      produced by tokenizing the text).
    num_image_tokens: features per image (N_img), e.g. 576 for CLIP-L/14 at 336; or
      one count per image of the sample, in order (any-resolution images).
    max_len: keep at most this many tokens (the end is cut).
    add_bos: prepend BOS; None = iff the tokenizer has one (Llama/Mistral/Gemma
      yes, Qwen2 no) and the rendered text does not start with it already.
    video_token_id, num_video_tokens: each `<video>` tag (the sample's "videos", in
      order) becomes `num_video_tokens` copies of `video_token_id`; without a video
      token a `<video>` tag is a `image_count_mismatch` (`data.example` writes a video
      as its frames' `<image>` tags for such models).

  Returns:
    TokenizedSample with input_ids, labels int32[L] (L <= max_len), or
    Rejected(sample_id, reason, detail). Never a sample without a learned token.
  """
  per_image = None if isinstance(num_image_tokens, (int, np.integer)) else [int(n) for n in num_image_tokens]
  smallest = num_image_tokens if per_image is None else min(per_image, default=1)
  if smallest < 1 or max_len < 1 or image_token_id < 0:
    raise ValueError(
        f"need num_image_tokens >= 1, max_len >= 1, image_token_id >= 0; "
        f"got {num_image_tokens}, {max_len}, {image_token_id}"
    )
  sid = sample_id_of(sample)
  reject = lambda reason, detail: Rejected(sid, reason, detail)
  conversation = sample.get("conversations")
  if not isinstance(conversation, Sequence) or isinstance(conversation, str):
    return reject(
        RejectReason.TEMPLATE_MISMATCH, f"'conversations' must be a list of turns, got {type(conversation).__name__}"
    )
  template = get_template(template, tokenizer)
  try:
    _, turns = normalize_conversation(conversation)
    for turn in turns:
      if turn.role == "assistant" and not turn.text.strip():
        return reject(
            RejectReason.EMPTY_ANSWER,
            f"turn {turn.index} (assistant) is {'whitespace only' if turn.text else 'empty'}: "
            f"it would train the end token alone",
        )
    segments = _merge(template.render(conversation))
  except ConversationError as e:
    return reject(RejectReason.TEMPLATE_MISMATCH, f"template {template.name!r}: {e}")
  text = "".join(s.text for s in segments)

  try:
    n_images, n_videos = len(image_list(sample)), len(video_list(sample))
  except RecordError as e:  # both "image" and "images": which is meant is not ours to guess
    return reject(RejectReason.BAD_RECORD, str(e))
  order = tag_order([{"value": text}])  # media tags of the rendered text, in order
  n_tags, n_video_tags = order.count(IMAGE_TAG), order.count(VIDEO_TAG)
  if n_tags != n_images:
    return reject(
        RejectReason.IMAGE_COUNT_MISMATCH, f"{n_tags} {IMAGE_TAG} tags in the rendered text, {n_images} images given"
    )
  if n_video_tags != n_videos or (n_videos and video_token_id is None):
    given = f"{n_videos} videos given" + ("" if video_token_id is not None else " (this model takes no video token)")
    return reject(RejectReason.IMAGE_COUNT_MISMATCH, f"{n_video_tags} {VIDEO_TAG} tags in the rendered text, {given}")
  if n_videos:  # one kind of tag from here on ("<video>" and "<image>" are both 7 characters: offsets hold)
    segments = [Segment(seg.text.replace(VIDEO_TAG, IMAGE_TAG), seg.is_target) for seg in segments]
    text = "".join(seg.text for seg in segments)

  whole, chunks = _encode_chunks(
      text, tokenizer, _wants_bos(text, tokenizer, add_bos), _splits_at_images(template, tokenizer)
  )
  for placeholder in [image_token_id] + ([video_token_id] if n_videos else []):
    if placeholder in whole:
      return reject(
          RejectReason.IMAGE_COUNT_MISMATCH,
          f"the text itself tokenizes to {'image' if placeholder == image_token_id else 'video'}_token_id "
          f"{placeholder} at token {whole.index(placeholder)}",
      )

  labels = [IGNORE] * len(whole)
  seg_start, start_tok = 0, 0
  for k, seg in enumerate(segments):
    end_char = seg_start + len(seg.text)
    if k + 1 < len(segments):
      end_tok, why = _token_at_boundary(text, end_char, whole, chunks, tokenizer)
      kept = len(seg.text.rstrip())
      if end_tok is None and seg.is_target and 0 < kept < len(seg.text):
        # Whitespace after an answer's end token that the tokenizer joins to the next turn ("</s> [INST]" ->
        # '</s>', '▁[') belongs to that turn: the model stops before it.
        end_tok, _ = _token_at_boundary(text, seg_start + kept, whole, chunks, tokenizer)
      if end_tok is None:
        return reject(RejectReason.TEMPLATE_MISMATCH, f"template {template.name!r}: {why}")
    else:
      end_tok = len(whole)
    if seg.is_target:
      labels[start_tok:end_tok] = [IGNORE if i == _IMAGE else i for i in whole[start_tok:end_tok]]
    seg_start, start_tok = end_char, end_tok

  if all(label == IGNORE for label in labels):
    n_turns = len(conversation)
    return reject(RejectReason.NO_TARGET, f"no answer tokens to learn ({n_turns} turns, template {template.name!r})")
  if template.learned_tokens:  # LLaVA-NeXT: structural tokens learned in every turn
    learned = learned_token_ids(tokenizer, template.learned_tokens)
    labels = [i if i in learned else label for i, label in zip(whole, labels)]
  ids = np.asarray(whole, np.int64)
  lab = np.asarray(labels, np.int64)

  if per_image is not None and len(per_image) != n_images:
    raise ValueError(f"sample {sid}: {len(per_image)} image token counts for {n_images} images")
  image_counts = iter(per_image if per_image is not None else [num_image_tokens] * n_images)
  counts = np.asarray([num_video_tokens if t == VIDEO_TAG else next(image_counts) for t in order], np.int64)
  tag_ids = [video_token_id if t == VIDEO_TAG else image_token_id for t in order]
  is_image = ids == _IMAGE
  reps = np.ones(len(ids), np.int64)
  reps[is_image] = counts
  placed = ids.copy()
  placed[is_image] = tag_ids
  input_ids = np.repeat(placed, reps).astype(np.int32)
  labels_out = np.repeat(lab, reps).astype(np.int32)

  truncated = len(input_ids) > max_len
  if truncated:
    image_starts = (np.cumsum(reps) - reps)[is_image]
    input_ids, labels_out = input_ids[:max_len], labels_out[:max_len]
    if not (labels_out != IGNORE).any():
      return reject(
          RejectReason.TRUNCATED_NO_TARGET, f"{int(reps.sum())} tokens cut to max_len {max_len}: no answer token left"
      )
    cut = [k for k, s in enumerate(image_starts) if s + counts[k] > max_len]
    if cut:
      return reject(
          RejectReason.TRUNCATED_IMAGE,
          f"max_len {max_len} cuts {'video' if order[cut[0]] == VIDEO_TAG else 'image'} {cut[0]} of {len(order)} "
          f"media (its {int(counts[cut[0]])} tokens start at "
          f"{int(image_starts[cut[0]])})",
      )
  return TokenizedSample(sid, input_ids, labels_out, n_images, truncated)


def tokenize_prompt(
    text: str,
    tokenizer: Tokenizer,
    *,
    image_token_id: int,
    num_image_tokens: int,
    add_bos: bool | None = None,
    template=None,
) -> np.ndarray:
  """A generation prompt (e.g. from `templates.prompt_for_generation`) -> int32[T], tokenized as in training.

  `template`: the one that rendered `text`; "hf" (a ChatTemplate) encodes `<image>` with the tokenizer's own
  token as training did (None: split at the tags, as the built-in templates do).
  """
  split = template is None or _splits_at_images(get_template(template, tokenizer), tokenizer)
  ids = np.asarray(_encode_chunks(text, tokenizer, _wants_bos(text, tokenizer, add_bos), split)[0], np.int64)
  is_image = ids == _IMAGE
  return np.repeat(np.where(is_image, image_token_id, ids), np.where(is_image, num_image_tokens, 1)).astype(np.int32)


def apply_policy(
    result: TokenizedSample | Rejected, policy: str, counters: MutableMapping[str, int]
) -> TokenizedSample | None:
  """Counts a rejection under `counters[reason]` and skips it (returns None) or raises.

  Args:
    result: what `tokenize_conversation` (or the image loader, as
      `Rejected(..., RejectReason.BAD_IMAGE, ...)`) returned.
    policy: "skip" (count, log the first few per reason and every 1000th,
      return None) or "raise" (count, then raise ValueError naming the sample
      id, the reason and the detail).
    counters: mutated in place, keyed by reason value ("template_mismatch", ...).

  Returns:
    The TokenizedSample unchanged, or None for a skipped rejection.
  """
  if policy not in ("skip", "raise"):
    raise ValueError(f"policy must be 'skip' or 'raise', got {policy!r}")
  if not isinstance(result, Rejected):
    return result
  key = RejectReason(result.reason).value
  counters[key] = counters.get(key, 0) + 1
  if policy == "raise":
    raise ValueError(str(result))
  n = counters[key]
  if n <= _LOG_FIRST or n % _LOG_EVERY == 0:
    log.warning("%s [%s #%d]", result, key, n)
  return None
