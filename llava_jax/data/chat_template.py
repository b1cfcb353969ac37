"""`template="hf"`: the checkpoint's own Jinja chat template, rendered as transformers renders it, with label masks.

    tok = load_tokenizer(checkpoint_dir)          # reads chat_template.jinja / tokenizer_config.json
    tmpl = get_template("hf", tok)                # a ChatTemplate
    segs = tmpl.render(conversation)              # [Segment(text, is_target), ...]
    tmpl.prompt_for_generation(conversation[:1])  # add_generation_prompt=True

Rendering follows `transformers.utils.chat_template_utils` without importing
transformers: jinja2's `ImmutableSandboxedEnvironment` (templates from the
Hub are untrusted code) with `trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, the `{% generation %}` tag, a `tojson` that does not
escape HTML, `raise_exception`, `strftime_now`, and the tokenizer's special
tokens (`bos_token`, `eos_token`, ...) as variables. The template writes its
own BOS if it wants one (`tokenize` then adds none).

Turns become messages `{"role": "system" | "user" | "assistant", "content": ...}`
(LLaVA's "human"/"gpt" mapped, a leading assistant turn dropped, `<image>`
tags moved to the front of their turn as LLaVA does). `content` is the string,
or for templates that render image parts (llava-hf's, Qwen2-VL's: they
mention an 'image' type) or only read parts, a list `[{"type": "image"}, ...,
{"type": "text", "text": ...}]`, so images come out as the model's own
placeholders; detected from the template source (`content_format="auto"`).

Label masks:
- with `{% generation %}` blocks: exactly the text inside them is target,
  which is what `apply_chat_template(..., return_assistant_tokens_mask=True)`
  marks (tested against it);
- without: from rendering prefixes, as TRL's prompt-completion data does:
  for assistant message k the target is what `messages[:k+1]` renders beyond
  `messages[:k]` with `add_generation_prompt=True` (answer + end-of-turn
  text; e.g. "A cat.<|im_end|>\\n" for Qwen2, "A cat.<|eot_id|>" for
  Llama-3). Both renderings must be prefixes of the whole conversation's; a
  template that is not (Mistral's v3 template moves the system text to the
  last user turn) raises ConversationError and the sample is rejected as
  `template_mismatch`, so wrap its answers in `{% generation %}` instead.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import re
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

from llava_jax.data.templates import IMAGE_TAG, ConversationError, Segment, normalize_conversation

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# A template that renders image parts itself (llava-hf's, Qwen2-VL's, Gemma-3's) gets parts, so images come out
# as the model's own placeholders; one that handles string content says so; one that only reads parts needs them.
_IMAGE_PARTS = re.compile(r"['\"]image['\"]")
_HANDLES_STRING = re.compile(r"content['\"]?\]?\s+is\s+string")
_READS_PARTS = re.compile(
    r"for\s+\w+\s+in\s+[\w.\[\]'\"]*content['\"]?\]?\s*(\||%)|"
    r"content['\"]?\]?\s*\[\s*0\s*\]|content['\"]?\]?\s*\|\s*selectattr"
)
_SENTINEL = "\x00answer\x00"


class _GenerationTracker(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: records each block's character span (transformers' AssistantTracker)."""

  tags = {"generation"}

  def __init__(self, environment):
    super().__init__(environment)
    environment.extend(track_generation=self.track)
    self._blocks = None
    self._spans = None

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

  def _generation(self, caller):
    text = caller()
    if self._blocks is not None:
      start = len("".join(self._blocks))
      self._spans.append((start, start + len(text)))
    return text

  @contextlib.contextmanager
  def track(self, blocks: list, spans: list):
    if self._blocks is not None:
      raise RuntimeError("generation tracker already active")
    self._blocks, self._spans = blocks, spans
    try:
      yield
    finally:
      self._blocks = self._spans = None


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
  """The template compiled in a sandboxed environment configured as transformers configures it."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ValueError(f"chat template does not compile (line {e.lineno}): {e.message}") from None


def detect_content_format(source: str) -> str:
  """ "parts" if the template renders image parts or only reads a list of parts, else "string"."""
  if _IMAGE_PARTS.search(source) or (_READS_PARTS.search(source) and not _HANDLES_STRING.search(source)):
    return "parts"
  return "string"


class ChatTemplate:
  """A Jinja chat template with the `Template` interface (`render`, `prompt_for_generation`, `stop`).

  Args:
    source: the Jinja text.
    special_tokens: template variables such as {"bos_token": "<s>", "eos_token": "</s>"} (None values dropped).
    content_format: "auto" (detect), "string" or "parts" (see the module docstring).
    origin: where the template came from, for messages.
  """

  name = "hf"
  learned_tokens: tuple[str, ...] = ()
  image_only_prompt = False
  split_at_images = False  # the text is encoded whole, `<image>` as the tokenizer's own token (HF processors)

  def __init__(
      self,
      source: str,
      *,
      special_tokens: Mapping[str, str | None] = (),
      content_format: str = "auto",
      origin: str = "<chat_template>",
  ):
    if content_format not in ("auto", "string", "parts"):
      raise ValueError(f"content_format must be 'auto', 'string' or 'parts', got {content_format!r}")
    self.source = source
    self.special_tokens = {k: v for k, v in dict(special_tokens).items() if v is not None}
    self.content_format = detect_content_format(source) if content_format == "auto" else content_format
    self.origin = origin
    self.has_generation = bool(_GENERATION_TAG.search(source))
    self._compiled = compile_template(source)

  def __reduce__(self):  # compiled Jinja does not pickle; data-loader workers recompile (cached)
    return (
        ChatTemplate,
        (self.source,),
        {"special_tokens": self.special_tokens, "content_format": self.content_format, "origin": self.origin},
    )

  def __setstate__(self, state):
    self.__init__(self.source, **state)

  def __repr__(self):
    return f"ChatTemplate({self.origin}, content_format={self.content_format!r}, generation={self.has_generation})"

  def messages(self, conversation: Sequence[Mapping]) -> list[dict[str, Any]]:
    """LLaVA turns -> the messages the template sees."""
    system, turns = normalize_conversation(conversation)
    out = [] if system is None else [{"role": "system", "content": self._content(system, 0)}]
    for turn in turns:
      out.append({"role": turn.role, "content": self._content(turn.text, turn.text.count(IMAGE_TAG))})
    return out

  def _content(self, text: str, n_images: int):
    rest = text.replace(IMAGE_TAG, "").strip() if n_images else text
    if self.content_format == "string":
      return (IMAGE_TAG + "\n") * n_images + rest if n_images else text
    return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": rest}]

  def render_text(
      self, messages: Sequence[Mapping], add_generation_prompt: bool = False
  ) -> tuple[str, list[tuple[int, int]]]:
    """-> (rendered text, character spans of its `{% generation %}` blocks)."""
    blocks, spans = [], []
    try:
      with self._compiled.environment.track_generation(blocks, spans):
        for block in self._compiled.generate(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self.special_tokens,
        ):
          blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
      raise ConversationError(f"chat template ({self.origin}): {e}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # a template expecting other content
      raise ConversationError(
          f"chat template ({self.origin}) failed on these messages: "
          f"{type(e).__name__}: {e} (content_format={self.content_format!r})"
      ) from None
    return "".join(blocks), spans

  def render(self, conversation: Sequence[Mapping]) -> list[Segment]:
    """The whole conversation as prompt / target segments (see the module docstring for the masks)."""
    messages = self.messages(conversation)
    text, spans = self.render_text(messages)
    if not self.has_generation:
      spans = self._prefix_spans(messages, text)
    segments, pos = [], 0
    for start, end in sorted(spans):
      if start < pos:
        raise ConversationError(f"chat template ({self.origin}): generation blocks overlap at char {start}")
      segments += [Segment(text[pos:start], False), Segment(text[start:end], True)]
      pos = end
    segments.append(Segment(text[pos:], False))
    return [s for s in segments if s.text]

  def _prefix_spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
    spans = []
    for k, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self.render_text(messages[:k], add_generation_prompt=True)[0]
      upto = self.render_text(messages[: k + 1])[0]
      for what, part, whole in (
          ("the conversation before it plus the generation prompt", before, upto),
          ("the conversation up to it", upto, full),
      ):
        if not whole.startswith(part):
          j = next((i for i, (a, b) in enumerate(zip(part, whole)) if a != b), min(len(part), len(whole)))
          raise ConversationError(
              f"chat template ({self.origin}) is not prefix-stable at message {k}: {what} renders "
              f"{part[max(0, j - 30):j + 30]!r}, the longer conversation {whole[max(0, j - 30):j + 30]!r} "
              f"(char {j}); mark the answers with {{% generation %}} blocks to train with it"
          )
      spans.append((len(before), len(upto)))
    return spans

  def prompt_for_generation(self, conversation: Sequence[Mapping]) -> str:
    """All turns so far plus the template's generation prompt (`add_generation_prompt=True`)."""
    messages = self.messages(conversation)
    if not messages or messages[-1]["role"] != "user":
      raise ConversationError("prompt_for_generation needs a conversation ending with a user turn")
    return self.render_text(messages, add_generation_prompt=True)[0]

  @functools.cached_property
  def stop(self) -> str:
    """What ends an answer: the text the template writes after an assistant message (stripped), else eos_token."""
    try:
      text, _ = self.render_text(self.messages([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": _SENTINEL}]))
    except ConversationError:
      text = ""
    after = text.split(_SENTINEL, 1)[1].strip() if _SENTINEL in text else ""
    return after or self.special_tokens.get("eos_token", "")


@functools.lru_cache(maxsize=16)
def _cached(source: str, special: tuple, origin: str) -> ChatTemplate:
  return ChatTemplate(source, special_tokens=dict(special), origin=origin)


def from_tokenizer(tokenizer) -> ChatTemplate:
  """The tokenizer's `chat_template` (read from its checkpoint by `load_tokenizer`), compiled once per process."""
  source = getattr(tokenizer, "chat_template", None)
  if tokenizer is None or not source:
    where = getattr(tokenizer, "name", None)
    raise ValueError(
        "template 'hf' renders the checkpoint's own chat template, but "
        + (
            f"tokenizer {where} has none (no chat_template.jinja, no chat_template in tokenizer_config.json)"
            if tokenizer is not None
            else "no tokenizer was given"
        )
    )
  special = tuple(sorted((k, v) for k, v in tokenizer.special_token_strings().items() if v is not None))
  return _cached(source, special, getattr(tokenizer, "name", "<tokenizer>"))
