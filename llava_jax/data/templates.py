"""Conversation templates: LLaVA-style conversations -> text segments marked prompt or target.

A conversation is a list of turns in LLaVA's JSON form
(`{"from": "human" | "gpt", "value": str}`) or the chat form
(`{"role": "user" | "assistant" | "system", "content": str}`). A leading
assistant turn is dropped and a leading system turn replaces the template's
system text (LLaVA drops a leading "gpt" turn too); after that, turns must
alternate user, assistant, user, ...

`render` returns `Segment(text, is_target)` pieces whose concatenation is the
full training text. Targets are exactly what the reference implementation
named in each template's `reference` leaves unmasked: for LLaVA's templates
each answer with the text that ends it (`" answer</s>"` for vicuna_v1,
`" answer </s>"` for llama_2 / mistral_instruct); for LLaVA-NeXT's
(`*_llava_next`) the whole assistant turn plus the structural tokens of every
turn (`Template.learned_tokens`, applied per token by `tokenize`).
`prompt_for_generation` renders a conversation that ends with a user turn up
to where the assistant's answer starts; the model then generates the answer
and stops at `template.stop`.

`template="hf"` (`get_template("hf", tokenizer)`) renders the checkpoint's
own Jinja chat template instead (`llava_jax.data.chat_template`).

`<image>` placement follows LLaVA's `preprocess_multimodal`: in a turn that
contains `<image>`, the tags are removed, the rest stripped, and the tags put
in front, each followed by "\\n" (`"<image>\\nWhat is this?"`). LLaVA collapses
several tags in one turn into one; we keep their count so a tag/image count
mismatch stays visible. `plain` (LLaVA's pretraining format) keeps only the
image tags of the user turn and the caption: `"<image>" + caption + "\\n"`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"  # where a video goes (infer.loading.LoadedModel.encode_prompt expands it)

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant", "model")


class ConversationError(ValueError):
  """The conversation does not fit the template (roles out of order, plain without an image, ...)."""


class Segment(NamedTuple):
  """A piece of rendered text; `is_target` pieces are learned, the rest masked."""

  text: str
  is_target: bool


class Turn(NamedTuple):
  """One turn after normalisation: role "user" | "assistant", its text, its index in the input list."""

  role: str
  text: str
  index: int


@dataclasses.dataclass(frozen=True)
class Template:
  """One conversation format. `{content}` / `{system}` are replaced literally (no other braces are special).

  Text of a conversation U1 A1 U2 A2 ... (rounds after the first start with
  `round_prefix`):

      [system_format]  user_format(U1)  assistant_start  assistant_format(A1)
      round_prefix  user_format(U2)  assistant_start  assistant_format(A2) ...

  Only `assistant_format(A_i)` is target (and `assistant_start` if
  `learn_assistant_start`). When `system_in_first_user`, the rendered system
  text is prepended to U1's content instead (Llama-2's `<<SYS>>` block,
  Gemma, Mistral). An empty system text renders nothing (unless
  `render_empty_system`: LLaVA's TWO style writes `system + " "` whatever it is).

  Attributes:
    name: key in TEMPLATES.
    system: default system text.
    system_format: how a non-empty system text is rendered.
    user_format: a user turn.
    assistant_start: opens the assistant's turn (the generation prompt ends with it).
    assistant_format: an answer with what ends it (target).
    stop: string that ends a generated answer.
    system_in_first_user: put the rendered system inside the first user turn.
    round_prefix: text before every user turn but the first (prompt).
    image_only_prompt: "plain": the user turn is reduced to its image tags.
    strip_content: strip each turn's text (and a system turn's, not a system
      text put into the first user turn), as the Jinja `| trim` of Meta's
      Llama-3 and Google's Gemma templates does.
    learn_assistant_start: `assistant_start` is learned too (LLaVA-NeXT).
    learned_tokens: token strings learned wherever they occur, also in user
      and system turns (LLaVA-NeXT's `unmask_tokens`); `tokenize` resolves
      each to the id the tokenizer has for it.
    image_placement: "llava" (every turn with tags: tags first, rest
      stripped), "llava_next" (LLaVA-NeXT's `preprocess_multimodal`: only a
      turn with exactly one tag, not already at its start; several tags stay
      where they are, as LLaVA-Interleave / OneVision multi-image data wants) or
      "inline" (no tag ever moves). A name "NAME@PLACEMENT" (`get_template`) is
      template NAME with that placement, e.g. "vicuna_v1@inline".
    render_empty_system: render `system_format` even for an empty system text.
    reference: the implementation whose strings and masks this reproduces.
  """

  name: str
  system: str
  system_format: str
  user_format: str
  assistant_start: str
  assistant_format: str
  stop: str
  system_in_first_user: bool = False
  round_prefix: str = ""
  image_only_prompt: bool = False
  strip_content: bool = False
  learn_assistant_start: bool = False
  learned_tokens: tuple[str, ...] = ()
  image_placement: str = "llava"
  render_empty_system: bool = False
  reference: str = ""

  def render(self, conversation: Sequence[Mapping]) -> list[Segment]:
    """See the module-level `render`."""
    system, turns = normalize_conversation(conversation)
    return _render(turns, system, self, open_answer=False)

  def prompt_for_generation(self, conversation: Sequence[Mapping]) -> str:
    """See the module-level `prompt_for_generation`."""
    system, turns = normalize_conversation(conversation)
    if not turns or turns[-1].role != "user":
      raise ConversationError("prompt_for_generation needs a conversation ending with a user turn")
    return "".join(s.text for s in _render(turns, system, self, open_answer=True))


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    " Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
_QWEN_SYSTEM = "You are a helpful assistant."

# LLaVA's SeparatorStyle.TWO (sep " ", sep2 "</s>"): "SYS USER: q ASSISTANT: a</s>USER: ...".
_TWO = dict(
    system_format="{system} ",
    user_format="USER: {content} ",
    assistant_start="ASSISTANT:",
    assistant_format=" {content}</s>",
    stop="</s>",
    render_empty_system=True,
)
# LLaVA's SeparatorStyle.LLAMA_2: "[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST] a </s>" + sep + "[INST] q2 [/INST] ...".
_LLAMA_2 = dict(
    system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    system_in_first_user=True,
    user_format="[INST] {content} [/INST]",
    assistant_start="",
    assistant_format=" {content} </s>",
    stop="</s>",
)
_LLAMA_3 = dict(
    system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_format="{content}<|eot_id|>",
    stop="<|eot_id|>",
    strip_content=True,
)
_CHATML = dict(
    system_format="<|im_start|>system\n{system}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_start="<|im_start|>assistant\n",
    assistant_format="{content}<|im_end|>\n",
    stop="<|im_end|>",
)
_LLAVA_NEXT = "LLaVA-NeXT train.py"

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            "plain",
            system="",
            system_format="",
            user_format="{content}",
            assistant_start="",
            assistant_format="{content}\n",
            stop="\n",
            image_only_prompt=True,
            reference="LLaVA conv_llava_plain + preprocess_plain (pretraining: image + caption)",
        ),
        Template(
            "vicuna_v1",
            system=_VICUNA_SYSTEM,
            **_TWO,
            reference="LLaVA conv_vicuna_v1 + preprocess_v1 (LLaVA-1.5 training, --version v1)",
        ),
        Template(
            "llava_v1",
            system=_LLAVA_V1_SYSTEM,
            **_TWO,
            reference="LLaVA conv_llava_v1 (LLaVA-1.5 inference, conv_mode llava_v1)",
        ),
        Template(
            "llama_2",
            system=_LLAMA_2_SYSTEM,
            round_prefix="<s>",
            **_LLAMA_2,
            reference="LLaVA conv_llama_2 + preprocess_llama_2 (Meta's Llama-2-chat format)",
        ),
        Template(
            "llava_llama_2",
            system=_LLAVA_SYSTEM,
            round_prefix="<s>",
            **_LLAMA_2,
            reference="LLaVA conv_llava_llama_2 + preprocess_llama_2",
        ),
        Template(
            "mistral_instruct",
            system="",
            **_LLAMA_2,
            reference="LLaVA conv_mistral_instruct (LLAMA_2 style, sep ''; LLaVA-1.6-Mistral)",
        ),
        Template(
            "llama3",
            system="",
            **_LLAMA_3,
            reference="Meta-Llama-3-Instruct chat template; answer + <|eot_id|> learned",
        ),
        Template(
            "llama3_llava_next",
            system=_LLAVA_SYSTEM,
            **_LLAMA_3,
            learn_assistant_start=True,
            image_placement="llava_next",
            learned_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            reference=f"{_LLAVA_NEXT} preprocess_llama3 (conv llava_llama_3)",
        ),
        Template(
            "chatml",
            system=_QWEN_SYSTEM,
            **_CHATML,
            reference="Qwen2-Instruct chat template; answer + <|im_end|>\\n learned",
        ),
        Template(
            "chatml_llava_next",
            system=_QWEN_SYSTEM,
            **_CHATML,
            learn_assistant_start=True,
            image_placement="llava_next",
            learned_tokens=("<|im_start|>", "<|im_end|>", "\n"),
            reference=f"{_LLAVA_NEXT} preprocess_qwen (conv qwen_1_5 / qwen_2)",
        ),
        Template(
            "gemma",
            system="",
            system_format="{system}\n\n",
            system_in_first_user=True,
            user_format="<start_of_turn>user\n{content}<end_of_turn>\n",
            assistant_start="<start_of_turn>model\n",
            assistant_format="{content}<end_of_turn>\n",
            stop="<end_of_turn>",
            strip_content=True,
            reference="Gemma instruct chat template (a system text opens the first user turn, as Gemma-3's)",
        ),
    ]
}


IMAGE_PLACEMENTS = ("llava", "llava_next", "inline")  # see Template.image_placement


def get_template(name_or_template, tokenizer=None):
  """A Template by name, the Template itself, or for "hf" the tokenizer's own chat template.

  Args:
    name_or_template: a `TEMPLATES` key, "hf", or a Template / ChatTemplate. A key
      may end in "@PLACEMENT" (one of `IMAGE_PLACEMENTS`): the template with that
      `image_placement`, e.g. "vicuna_v1@inline" keeps every `<image>` where the
      conversation puts it. The name travels as it is (configs, run.json, --template).
    tokenizer: a `llava_jax.tokenizer.Tokenizer`; needed for "hf" (its
      `chat_template`, read from the checkpoint, and its special tokens).

  Returns:
    A `Template`, or a `llava_jax.data.chat_template.ChatTemplate` (same
    `name`, `stop`, `render`, `prompt_for_generation`, `learned_tokens`).
  """
  if not isinstance(name_or_template, str):
    return name_or_template
  if name_or_template == "hf":
    from llava_jax.data import chat_template  # local: jinja2 is only needed for "hf"

    return chat_template.from_tokenizer(tokenizer)
  base, at, placement = name_or_template.partition("@")
  if at:
    if base == "hf":
      raise ValueError(
          f"template {name_or_template!r}: 'hf' renders the checkpoint's chat template, which "
          "places images itself; an image placement applies to the built-in templates only"
      )
    if placement not in IMAGE_PLACEMENTS:
      raise ValueError(
          f"template {name_or_template!r}: unknown image placement {placement!r}; known: {list(IMAGE_PLACEMENTS)}"
      )
    return dataclasses.replace(get_template(base), name=name_or_template, image_placement=placement)
  try:
    return TEMPLATES[name_or_template]
  except KeyError:
    raise ValueError(
        f"unknown conversation template {name_or_template!r}; known: {sorted(TEMPLATES)} "
        f"and 'hf' (the checkpoint's own chat_template)"
    ) from None


def move_image_tags_first(text: str, placement: str = "llava") -> str:
  """LLaVA's `preprocess_multimodal` for one turn: "a <image> b" -> "<image>\\na  b" (tag count kept).

  `placement="llava_next"`: LLaVA-NeXT's, which moves a tag only if it is the turn's one tag and not already
  first (so "<image>\\n x " stays as is, and several tags stay where they are). `"inline"`: never moves one.
  """
  n = text.count(IMAGE_TAG)
  if n == 0 or placement == "inline":
    return text
  if placement == "llava_next" and (n > 1 or text.startswith(IMAGE_TAG)):
    return text
  rest = text.replace(IMAGE_TAG, "").strip()
  return ((IMAGE_TAG + "\n") * n + rest).strip()


def normalize_conversation(conversation: Sequence[Mapping]) -> tuple[str | None, list[Turn]]:
  """-> (system override or None, turns alternating "user"/"assistant", starting with "user").

  Raises:
    ConversationError naming the turn (its index in `conversation`) that is malformed or out of order.
  """
  turns = []
  for k, turn in enumerate(conversation):
    if not isinstance(turn, Mapping):
      raise ConversationError(f"turn {k} must be a mapping with 'from'/'value', got {type(turn).__name__}")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if not isinstance(role, str) or not isinstance(text, str):
      raise ConversationError(f"turn {k} needs string 'from'/'value' (or 'role'/'content'), got {dict(turn)!r}")
    role = role.lower()
    if role in _USER_ROLES:
      role = "user"
    elif role in _ASSISTANT_ROLES:
      role = "assistant"
    elif role != "system":
      raise ConversationError(f"turn {k} has unknown role {role!r}")
    turns.append(Turn(role, text, k))
  system = None
  if turns and turns[0].role == "system":
    system = turns.pop(0).text
  if turns and turns[0].role == "assistant":
    turns = turns[1:]  # LLaVA: "Skip the first one if it is not from human"
  for k, turn in enumerate(turns):
    want = "user" if k % 2 == 0 else "assistant"
    if turn.role != want:
      raise ConversationError(
          f"turn {turn.index} is {turn.role!r}, expected {want!r} (after dropping a leading "
          f"system/assistant turn): turns must alternate user/assistant"
      )
  return system, turns


def _fill(fmt: str, **values: str) -> str:
  for key, value in values.items():
    fmt = fmt.replace("{" + key + "}", value)
  return fmt


def _render(turns: list[Turn], system: str | None, t: Template, *, open_answer: bool) -> list[Segment]:
  """Segments for alternating turns; `open_answer` appends `assistant_start` after a final user turn."""
  system = t.system if system is None else system
  if t.strip_content and not t.system_in_first_user:
    system = system.strip()
  rendered_system = _fill(t.system_format, system=system) if system or t.render_empty_system else ""
  if t.image_only_prompt:
    n_answers = sum(turn.role == "assistant" for turn in turns)
    if len(turns) != (1 if open_answer else 2) or n_answers != (0 if open_answer else 1):
      raise ConversationError(f"needs exactly one user turn and one answer (image + caption), got {len(turns)} turns")
    if IMAGE_TAG not in turns[0].text:
      raise ConversationError(f"needs {IMAGE_TAG} in the user turn")
    rendered_system = ""  # LLaVA's plain keeps image + caption only
  segments: list[Segment] = []
  prompt = "" if t.system_in_first_user else rendered_system
  for k, turn in enumerate(turns):
    content = move_image_tags_first(turn.text, t.image_placement)
    if t.strip_content:
      content = content.strip()
    if turn.role == "user":
      if t.image_only_prompt:
        content = IMAGE_TAG * turn.text.count(IMAGE_TAG)
      if k == 0 and t.system_in_first_user:
        content = rendered_system + content
      prompt += (t.round_prefix if k > 0 else "") + _fill(t.user_format, content=content)
      if open_answer and k + 1 == len(turns):
        prompt += t.assistant_start
    else:
      start = "" if t.learn_assistant_start else t.assistant_start
      segments.append(Segment(prompt + start, False))
      prompt = ""
      learned_start = t.assistant_start if t.learn_assistant_start else ""
      segments.append(Segment(learned_start + _fill(t.assistant_format, content=content), True))
  segments.append(Segment(prompt, False))
  return [s for s in segments if s.text]


def render(conversation: Sequence[Mapping], template, tokenizer=None) -> list[Segment]:
  """A whole conversation -> segments (`"".join(s.text for s in segs)` is the training text).

  Prompt text between answers is one segment; each answer (with its end
  separator/token) is one target segment. A trailing user turn without an
  answer is rendered as prompt only (nothing to learn from it).

  Args:
    conversation: the turns (see the module docstring).
    template: a `TEMPLATES` name, "hf", or a Template / ChatTemplate.
    tokenizer: needed for "hf" (see `get_template`).

  Raises:
    ConversationError (a ValueError) if the turns do not fit the template.
  """
  return get_template(template, tokenizer).render(conversation)


def prompt_for_generation(conversation: Sequence[Mapping], template, tokenizer=None) -> str:
  """Text to feed the model for the next answer: all turns so far, then the assistant's turn opener.

  `conversation` must end with a user turn; e.g. vicuna_v1 gives
  "SYSTEM USER: <image>\\nWhat is it? ASSISTANT:" and the model continues with
  " It is a cat.</s>", exactly the target text it was trained on.
  """
  return get_template(template, tokenizer).prompt_for_generation(conversation)


# A conversation with every part a template renders: system text, image, two rounds.
PROBE_CONVERSATION = (
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A cat on a mat."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "Black and white."},
)


def probe_texts(template=None, tokenizer=None) -> list[str]:
  """The rendered text of `PROBE_CONVERSATION` (with and without its system turn, so with the template's own
  default system text) under `template` (None: every built-in template, and "hf" if the tokenizer has a chat
  template), to compare tokenizers on the template's own text."""
  names = (
      [template]
      if template is not None
      else sorted(TEMPLATES) + (["hf"] if getattr(tokenizer, "chat_template", None) else [])
  )
  out = []
  for name in names:
    t = get_template(name, tokenizer)
    for conv in (PROBE_CONVERSATION, PROBE_CONVERSATION[1:]):
      if getattr(t, "image_only_prompt", False):
        conv = PROBE_CONVERSATION[1:3]
      try:
        out.append("".join(s.text for s in t.render(list(conv))))
      except ConversationError:
        continue  # e.g. a chat template without a system role
  return out
