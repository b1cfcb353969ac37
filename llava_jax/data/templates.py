"""Conversation templates: LLaVA-style conversations -> text segments marked prompt or target.

A conversation is a list of turns in LLaVA's JSON form
(`{"from": "human" | "gpt", "value": str}`) or the chat form
(`{"role": "user" | "assistant" | "system", "content": str}`). A leading
assistant turn is dropped and a leading system turn replaces the template's
system text (LLaVA drops a leading "gpt" turn too); after that, turns must
alternate user, assistant, user, ...

`render` returns `Segment(text, is_target)` pieces whose concatenation is the
full training text. Targets are exactly what LLaVA's `preprocess_*` leave
unmasked: each assistant answer with the text that ends it (the separator and
end token: `" answer</s>"` for vicuna_v1, `"answer<|im_end|>\\n"` for chatml).
`prompt_for_generation` renders a conversation that ends with a user turn up
to where the assistant's answer starts; the model then generates the target
text and stops at `template.stop`.

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

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant", "model")


class ConversationError(ValueError):
  """The conversation does not fit the template (roles out of order, plain without an image, ...)."""


class Segment(NamedTuple):
  """A piece of rendered text; `is_target` pieces are learned, the rest masked."""
  text: str
  is_target: bool


@dataclasses.dataclass(frozen=True)
class Template:
  """One conversation format. `{content}` / `{system}` are replaced literally (no other braces are special).

  Text of a conversation U1 A1 U2 A2 ... (rounds after the first start with
  `round_prefix`):

      [system_format]  user_format(U1)  assistant_start  assistant_format(A1)
      round_prefix  user_format(U2)  assistant_start  assistant_format(A2) ...

  Only `assistant_format(A_i)` is target. When `system_in_first_user`, the
  rendered system text is prepended to U1's content instead (Llama-2's
  `<<SYS>>` block, Gemma, Mistral). An empty system text renders nothing.

  Attributes:
    name: key in TEMPLATES.
    system: default system text.
    system_format: how a non-empty system text is rendered.
    system_in_first_user: put the rendered system inside the first user turn.
    user_format: a user turn.
    assistant_start: opens the assistant's turn (prompt, not target).
    assistant_format: an answer with what ends it (target).
    round_prefix: text before every user turn but the first (prompt).
    stop: string that ends a generated answer.
    image_only_prompt: "plain": the user turn is reduced to its image tags.
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


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    " Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information.")

# LLaVA's SeparatorStyle.TWO (sep " ", sep2 "</s>"): "SYS USER: q ASSISTANT: a</s>USER: ...".
_TWO = dict(system_format="{system} ", user_format="USER: {content} ", assistant_start="ASSISTANT:",
            assistant_format=" {content}</s>", stop="</s>")

TEMPLATES: dict[str, Template] = {t.name: t for t in [
    # LLaVA pretraining (conv_llava_plain + preprocess_plain): "<image>caption\n".
    Template("plain", system="", system_format="", user_format="{content}", assistant_start="",
             assistant_format="{content}\n", stop="\n", image_only_prompt=True),
    # LLaVA conv_vicuna_v1 ("curious user") and conv_llava_v1 ("curious human"): same format.
    Template("vicuna_v1", system=_VICUNA_SYSTEM, **_TWO),
    Template("llava_v1", system=_LLAVA_V1_SYSTEM, **_TWO),
    # LLaVA conv_llama_2 (= Meta's chat format): "[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST] a </s><s>[INST] q2 [/INST]".
    Template("llama_2", system=_LLAMA_2_SYSTEM, system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
             system_in_first_user=True, user_format="[INST] {content} [/INST]", assistant_start="",
             assistant_format=" {content} </s>", round_prefix="<s>", stop="</s>"),
    # Mistral instruct (model card): "[INST] q [/INST] a</s>[INST] q2 [/INST]"; a system text goes into the first turn.
    Template("mistral_instruct", system="", system_format="{system}\n\n", system_in_first_user=True,
             user_format="[INST] {content} [/INST]", assistant_start="", assistant_format=" {content}</s>",
             stop="</s>"),
    # Qwen2 ChatML. Target includes "<|im_end|>\n" as in Qwen's and LLaVA-NeXT's preprocess_qwen.
    Template("chatml", system="You are a helpful assistant.",
             system_format="<|im_start|>system\n{system}<|im_end|>\n",
             user_format="<|im_start|>user\n{content}<|im_end|>\n", assistant_start="<|im_start|>assistant\n",
             assistant_format="{content}<|im_end|>\n", stop="<|im_end|>"),
    # Gemma instruct: no system role; a system text is prepended to the first user turn.
    Template("gemma", system="", system_format="{system}\n\n", system_in_first_user=True,
             user_format="<start_of_turn>user\n{content}<end_of_turn>\n", assistant_start="<start_of_turn>model\n",
             assistant_format="{content}<end_of_turn>\n", stop="<end_of_turn>"),
]}


def get_template(name_or_template: str | Template) -> Template:
  """A Template by name (or the Template itself)."""
  if isinstance(name_or_template, Template):
    return name_or_template
  try:
    return TEMPLATES[name_or_template]
  except KeyError:
    raise ValueError(f"unknown conversation template {name_or_template!r}; known: {sorted(TEMPLATES)}") from None


def move_image_tags_first(text: str) -> str:
  """LLaVA's `preprocess_multimodal` for one turn: "a <image> b" -> "<image>\\na  b" (tag count kept)."""
  n = text.count(IMAGE_TAG)
  if n == 0:
    return text
  rest = text.replace(IMAGE_TAG, "").strip()
  return ((IMAGE_TAG + "\n") * n + rest).strip()


def _normalize(conversation: Sequence[Mapping]) -> tuple[str | None, list[tuple[str, str]]]:
  """-> (system override or None, [(role, text)] alternating "user"/"assistant", starting with "user")."""
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
    turns.append((role, text))
  system = None
  if turns and turns[0][0] == "system":
    system = turns.pop(0)[1]
  if turns and turns[0][0] == "assistant":
    turns = turns[1:]  # LLaVA: "Skip the first one if it is not from human"
  for k, (role, _) in enumerate(turns):
    want = "user" if k % 2 == 0 else "assistant"
    if role != want:
      raise ConversationError(f"turn {k} (after dropping a leading system/assistant turn) is {role!r}, "
                              f"expected {want!r}: turns must alternate user/assistant")
  return system, turns


def _fill(fmt: str, **values: str) -> str:
  for key, value in values.items():
    fmt = fmt.replace("{" + key + "}", value)
  return fmt


def _render(turns: list[tuple[str, str]], system: str | None, t: Template, *, open_answer: bool) -> list[Segment]:
  """Segments for alternating turns; `open_answer` appends `assistant_start` after a final user turn."""
  system = t.system if system is None else system
  rendered_system = _fill(t.system_format, system=system) if system else ""
  if t.image_only_prompt:
    n_answers = sum(role == "assistant" for role, _ in turns)
    if len(turns) != (1 if open_answer else 2) or n_answers != (0 if open_answer else 1):
      raise ConversationError(f"needs exactly one user turn and one answer (image + caption), got {len(turns)} turns")
    if IMAGE_TAG not in turns[0][1]:
      raise ConversationError(f"needs {IMAGE_TAG} in the user turn")
    rendered_system = ""  # LLaVA's plain keeps image + caption only
  segments: list[Segment] = []
  prompt = "" if t.system_in_first_user else rendered_system
  for k, (role, text) in enumerate(turns):
    if role == "user":
      content = move_image_tags_first(text)
      if t.image_only_prompt:
        content = IMAGE_TAG * text.count(IMAGE_TAG)
      if k == 0 and t.system_in_first_user:
        content = rendered_system + content
      prompt += (t.round_prefix if k > 0 else "") + _fill(t.user_format, content=content)
      if k + 1 < len(turns) or open_answer:
        prompt += t.assistant_start
    else:
      segments.append(Segment(prompt, False))
      prompt = ""
      segments.append(Segment(_fill(t.assistant_format, content=move_image_tags_first(text)), True))
  segments.append(Segment(prompt, False))
  return [s for s in segments if s.text]


def render(conversation: Sequence[Mapping], template: str | Template) -> list[Segment]:
  """A whole conversation -> segments (`"".join(s.text for s in segs)` is the training text).

  Prompt text between answers is one segment; each answer (with its end
  separator/token) is one target segment. A trailing user turn without an
  answer is rendered as prompt only (nothing to learn from it).

  Raises:
    ConversationError (a ValueError) if the turns do not fit the template.
  """
  t = get_template(template)
  system, turns = _normalize(conversation)
  return _render(turns, system, t, open_answer=False)


def prompt_for_generation(conversation: Sequence[Mapping], template: str | Template) -> str:
  """Text to feed the model for the next answer: all turns so far, then the assistant's turn opener.

  `conversation` must end with a user turn; e.g. vicuna_v1 gives
  "SYSTEM USER: <image>\\nWhat is it? ASSISTANT:" and the model continues with
  " It is a cat.</s>", exactly the target text it was trained on.
  """
  t = get_template(template)
  system, turns = _normalize(conversation)
  if not turns or turns[-1][0] != "user":
    raise ConversationError("prompt_for_generation needs a conversation ending with a user turn")
  return "".join(s.text for s in _render(turns, system, t, open_answer=True))
