"""Conversation templates render the reference implementations' exact strings and mark exactly their targets.

References (see each Template's `reference`): LLaVA 1.2.2.post1 `conversation.py` (its `get_prompt` is ported
below, logic unchanged) and `train.py`; LLaVA-NeXT `train.py` (token-level tests in test_tokenize_reference.py);
Meta's Llama-3, Qwen2 and Gemma chat templates.
"""

import dataclasses
import random

import pytest

from llava_jax.data import templates as tp

CONV = [
    {"from": "human", "value": "What is this?\n<image>"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "Color?"},
    {"from": "gpt", "value": "Black."},
]

VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA2_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
LLAMA2_SYS = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false "
    "information."
)

# (template, full text, target segments), written out by hand from LLaVA's conversation.py / train.py.
EXPECTED = {
    "vicuna_v1": (
        VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Black.</s>",
        [" A cat.</s>", " Black.</s>"],
    ),
    "llava_v1": (
        LLAVA_SYS + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Black.</s>",
        [" A cat.</s>", " Black.</s>"],
    ),
    "llama_2": (
        "[INST] <<SYS>>\n" + LLAMA2_SYS + "\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A cat. </s>"
        "<s>[INST] Color? [/INST] Black. </s>",
        [" A cat. </s>", " Black. </s>"],
    ),
    "llava_llama_2": (
        "[INST] <<SYS>>\n" + LLAVA_LLAMA2_SYS + "\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A cat. </s>"
        "<s>[INST] Color? [/INST] Black. </s>",
        [" A cat. </s>", " Black. </s>"],
    ),
    # LLaVA conv_mistral_instruct: LLAMA_2 style with sep "" (no <s> between rounds), a space before each </s>.
    "mistral_instruct": (
        "[INST] <image>\nWhat is this? [/INST] A cat. </s>[INST] Color? [/INST] Black. </s>",
        [" A cat. </s>", " Black. </s>"],
    ),
    # Meta's Llama-3 template (BOS is the tokenizer's); Llama-3 fine-tuning learns answer + <|eot_id|>.
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nColor?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>",
        ["A cat.<|eot_id|>", "Black.<|eot_id|>"],
    ),
    # LLaVA-NeXT preprocess_llama3: its system text; the whole assistant turn (header too) is learned.
    "llama3_llava_next": (
        "<|start_header_id|>system<|end_header_id|>\n\n" + LLAVA_LLAMA2_SYS + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nColor?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>",
        [
            "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>",
        ],
    ),
    # LLaVA-NeXT preprocess_qwen: chatml text, whole assistant turns learned.
    "chatml_llava_next": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        "What is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nColor?"
        "<|im_end|>\n<|im_start|>assistant\nBlack.<|im_end|>\n",
        ["<|im_start|>assistant\nA cat.<|im_end|>\n", "<|im_start|>assistant\nBlack.<|im_end|>\n"],
    ),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?"
        "<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nColor?<|im_end|>\n"
        "<|im_start|>assistant\nBlack.<|im_end|>\n",
        ["A cat.<|im_end|>\n", "Black.<|im_end|>\n"],
    ),
    "gemma": (
        "<start_of_turn>user\n<image>\nWhat is this?<end_of_turn>\n<start_of_turn>model\nA cat.<end_of_turn>\n"
        "<start_of_turn>user\nColor?<end_of_turn>\n<start_of_turn>model\nBlack.<end_of_turn>\n",
        ["A cat.<end_of_turn>\n", "Black.<end_of_turn>\n"],
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_exact_text_and_targets(name):
  text, targets = EXPECTED[name]
  segs = tp.render(CONV, name)
  assert "".join(s.text for s in segs) == text
  assert [s.text for s in segs if s.is_target] == targets
  # prompt / target alternate, starting with prompt
  assert [s.is_target for s in segs] == [False, True, False, True]


def test_plain_keeps_only_image_and_caption():
  segs = tp.render(CONV[:2], "plain")
  assert segs == [tp.Segment("<image>", False), tp.Segment("A cat.\n", True)]
  assert tp.prompt_for_generation(CONV[:1], "plain") == "<image>"
  with pytest.raises(tp.ConversationError, match="exactly one user turn"):
    tp.render(CONV, "plain")
  with pytest.raises(tp.ConversationError, match="<image>"):
    tp.render([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], "plain")


def test_every_template_has_an_expectation():
  assert set(EXPECTED) | {"plain"} == set(tp.TEMPLATES)


@pytest.mark.parametrize("name", sorted(tp.TEMPLATES))
def test_prompt_for_generation_is_text_before_each_answer(name):
  conv = CONV[:2] if name == "plain" else CONV
  t = tp.TEMPLATES[name]
  segs = tp.render(conv, name)
  for k in range(0, len(conv), 2):
    prompt = tp.prompt_for_generation(conv[: k + 1], name)
    before = "".join(s.text for s in segs[: k + 1])  # everything up to answer k // 2
    # LLaVA-NeXT learns the assistant header too; the generation prompt ends with it all the same.
    assert prompt == before + (t.assistant_start if t.learn_assistant_start else ""), (name, k)
    assert segs[k + 1].is_target
    start = t.assistant_start if t.learn_assistant_start else ""
    assert segs[k + 1].text.startswith(start + t.assistant_format.split("{content}")[0])
    assert t.stop in segs[k + 1].text


def test_vicuna_generation_prompt_matches_llava():
  assert tp.prompt_for_generation(CONV[:1], "vicuna_v1") == VICUNA_SYS + " USER: <image>\nWhat is this? ASSISTANT:"


def test_image_tags_moved_to_front_like_llava():
  assert tp.move_image_tags_first("What is it?\n<image>") == "<image>\nWhat is it?"
  assert tp.move_image_tags_first("  <image> describe  ") == "<image>\ndescribe"
  assert tp.move_image_tags_first("a <image> b") == "<image>\na  b"  # LLaVA: replace then strip, inner spaces stay
  assert tp.move_image_tags_first("<image>") == "<image>"
  assert tp.move_image_tags_first("no image") == "no image"
  # Several tags are kept (LLaVA collapses them) so a count mismatch stays visible.
  assert tp.move_image_tags_first("<image> x <image>") == "<image>\n<image>\nx"


def test_roles_system_and_leading_assistant():
  chat = [
      {"role": "system", "content": "Be brief."},
      {"role": "assistant", "content": "dropped"},
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello"},
  ]
  assert "".join(s.text for s in tp.render(chat, "vicuna_v1")) == "Be brief. USER: Hi ASSISTANT: Hello</s>"
  assert tp.prompt_for_generation(chat[:3], "llama_2") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
  assert tp.prompt_for_generation(chat[:3], "gemma") == (
      "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
  )
  # LLaVA's LLAMA_2 style wraps a system text in <<SYS>> for mistral_instruct too.
  assert tp.prompt_for_generation(chat[:3], "mistral_instruct") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
  assert tp.prompt_for_generation(chat[:3], "llama3") == (
      "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
      "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
  )
  # An empty system text renders nothing (no <<SYS>> block, no chatml system turn).
  no_sys = [{"role": "system", "content": ""}] + chat[2:]
  assert "".join(s.text for s in tp.render(no_sys, "llama_2")) == "[INST] Hi [/INST] Hello </s>"
  assert tp.prompt_for_generation(no_sys[:2], "chatml") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_trailing_user_turn_is_prompt_only():
  segs = tp.render(CONV[:3], "vicuna_v1")
  assert segs[-1] == tp.Segment("USER: Color? ", False)
  assert sum(s.is_target for s in segs) == 1


def test_bad_conversations_raise():
  with pytest.raises(tp.ConversationError, match="turn 1 is 'user', expected 'assistant'"):
    tp.render([CONV[0], CONV[0]], "vicuna_v1")
  with pytest.raises(tp.ConversationError, match="unknown role 'narrator'"):
    tp.render([{"from": "narrator", "value": "x"}], "vicuna_v1")
  with pytest.raises(tp.ConversationError, match="string 'from'/'value'"):
    tp.render([{"from": "human"}], "vicuna_v1")
  with pytest.raises(tp.ConversationError, match="ending with a user turn"):
    tp.prompt_for_generation(CONV[:2], "vicuna_v1")
  with pytest.raises(ValueError, match="unknown conversation template 'nope'"):
    tp.get_template("nope")
  with pytest.raises(ValueError, match="no tokenizer was given"):
    tp.get_template("hf")


def _llava_get_prompt(style, system, messages, sep, sep2):
  """LLaVA conversation.py `get_prompt` for SeparatorStyle.TWO, LLAMA_2 and PLAIN (string messages; logic unchanged)."""
  if style == "TWO":
    seps = [sep, sep2]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
      if message:
        ret += role + ": " + message + seps[i % 2]
      else:
        ret += role + ":"
    return ret
  if style == "LLAMA_2":
    wrap_sys = lambda msg: f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg
    wrap_inst = lambda msg: f"[INST] {msg} [/INST]"
    ret = ""
    for i, (role, message) in enumerate(messages):
      if message:
        if i == 0:
          message = wrap_sys(system) + message
        if i % 2 == 0:
          message = wrap_inst(message)
          ret += sep + message
        else:
          ret += " " + message + " " + sep2
      else:
        ret += ""
    return ret.lstrip(sep)
  seps = [sep, sep2]  # PLAIN
  ret = system
  for i, (role, message) in enumerate(messages):
    if message:
      ret += message + seps[i % 2]
  return ret


def _llava_preprocess_multimodal(value):
  """LLaVA train.py preprocess_multimodal for one sentence (no im_start_end, no mmtag)."""
  if "<image>" in value:
    value = value.replace("<image>", "").strip()
    value = "<image>" + "\n" + value
    value = value.strip()
  return value


# name -> (sep_style, sep, sep2) of LLaVA's conv template.
_LLAVA_CONV = {
    "vicuna_v1": ("TWO", " ", "</s>"),
    "llava_v1": ("TWO", " ", "</s>"),
    "llama_2": ("LLAMA_2", "<s>", "</s>"),
    "llava_llama_2": ("LLAMA_2", "<s>", "</s>"),
    "mistral_instruct": ("LLAMA_2", "", "</s>"),
}


@pytest.mark.parametrize("name", sorted(_LLAVA_CONV))
def test_matches_llava_get_prompt_on_random_conversations(name):
  """Multi-turn, with and without a system text (LLaVA's conv.system) and images, as LLaVA renders them."""
  rng = random.Random(0)
  words = ["cat", "dog", "is", "the", "red?", "No.", "Yes!", "a\nb", " x "]
  t = tp.TEMPLATES[name]
  style, sep, sep2 = _LLAVA_CONV[name]
  for trial in range(60):
    n = 2 * rng.randint(1, 4)
    msgs = [" ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(n)]
    if trial % 3:
      k = rng.randrange(0, n, 2)
      msgs[k] = rng.choice(["<image>\n" + msgs[k], msgs[k] + " <image>", "a <image> b"])
    system = rng.choice([None, "Be brief.", ""])
    conv = ([{"from": "system", "value": system}] if system is not None else []) + [
        {"from": "human" if i % 2 == 0 else "gpt", "value": m} for i, m in enumerate(msgs)
    ]
    sys_text = t.system if system is None else system
    ref_msgs = [("USER" if i % 2 == 0 else "ASSISTANT", _llava_preprocess_multimodal(m)) for i, m in enumerate(msgs)]
    ref = _llava_get_prompt(style, sys_text, ref_msgs, sep, sep2)
    assert "".join(s.text for s in tp.render(conv, name)) == ref, (trial, conv)
    # the generation prompt equals LLaVA's with an empty final assistant message
    ref_prompt = _llava_get_prompt(style, sys_text, ref_msgs[:-1] + [("ASSISTANT", None)], sep, sep2)
    assert tp.prompt_for_generation(conv[:-1], name) == ref_prompt
    # targets: each answer and what ends it (preprocess_v1 / preprocess_llama_2)
    end = (" {} " + sep2) if style == "LLAMA_2" else (" {}" + sep2)
    assert [s.text for s in tp.render(conv, name) if s.is_target] == [end.format(m) for _, m in ref_msgs[1::2]]


def test_plain_matches_llava_preprocess_plain():
  for caption in ("A cat.", "two\nlines", " spaced "):
    conv = [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": caption}]
    # preprocess_plain: source[0]['value'] = "<image>"; conversation = "<image>" + caption + conv.sep ("\n")
    assert "".join(s.text for s in tp.render(conv, "plain")) == "<image>" + caption + "\n"


def test_strip_content_and_image_placement():
  conv = [{"from": "human", "value": "  Hi there  "}, {"from": "gpt", "value": " Hello. "}]
  assert [s.text for s in tp.render(conv, "llama3") if s.is_target] == ["Hello.<|eot_id|>"]  # Jinja `| trim`
  assert [s.text for s in tp.render(conv, "gemma") if s.is_target] == ["Hello.<end_of_turn>\n"]
  assert [s.text for s in tp.render(conv, "chatml") if s.is_target] == [" Hello. <|im_end|>\n"]  # no trim
  assert tp.move_image_tags_first("<image>\n x ", "llava_next") == "<image>\n x "  # already first: unchanged
  assert tp.move_image_tags_first("x <image>", "llava_next") == "<image>\nx"
  assert tp.move_image_tags_first("<image> a <image>", "llava_next") == "<image> a <image>"  # interleaved: kept


def test_templates_are_frozen_and_replaceable():
  t = tp.TEMPLATES["vicuna_v1"]
  with pytest.raises(dataclasses.FrozenInstanceError):
    t.system = "x"
  tight = dataclasses.replace(t, name="tight", assistant_format="{content}</s>")
  assert tp.get_template(tight) is tight
  assert "".join(s.text for s in tp.render(CONV[:2], tight)).endswith("ASSISTANT:A cat.</s>")


TWO_IMAGES = [
    {"from": "human", "value": "Here is one <image> and here another <image>. Which has more circles?"},
    {"from": "gpt", "value": "The first."},
]


def test_image_placement_is_chosen_by_the_template_name():
  """LLaVA-1.5 templates move every tag to the front of its turn; "NAME@inline" keeps the
  conversation's order (interleaved multi-image data); "NAME@llava_next" moves a lone tag only."""
  user = lambda name: tp.render(TWO_IMAGES, name)[0].text
  assert user("vicuna_v1").endswith(
      "USER: <image>\n<image>\nHere is one  and here another . Which has more circles? ASSISTANT:"
  )
  assert user("vicuna_v1@inline").endswith(
      "USER: Here is one <image> and here another <image>. Which has more circles? ASSISTANT:"
  )
  assert user("vicuna_v1@llava_next") == user("vicuna_v1@inline")  # several tags stay where they are
  one = [{"from": "human", "value": "What is it? <image>"}, {"from": "gpt", "value": "A cat."}]
  assert "USER: <image>\nWhat is it? ASSISTANT:" in tp.render(one, "vicuna_v1@llava_next")[0].text
  assert "USER: What is it? <image> ASSISTANT:" in tp.render(one, "vicuna_v1@inline")[0].text
  inline = tp.get_template("chatml@inline")
  assert inline.name == "chatml@inline" and inline.image_placement == "inline"
  assert inline.stop == tp.TEMPLATES["chatml"].stop
  prompt = tp.prompt_for_generation(TWO_IMAGES[:1], "vicuna_v1@inline")
  assert prompt.endswith("USER: Here is one <image> and here another <image>. Which has more circles? ASSISTANT:")


def test_unknown_image_placement_is_refused():
  with pytest.raises(ValueError, match=r"unknown image placement 'middle'; known: \['llava', 'llava_next', 'inline'\]"):
    tp.get_template("vicuna_v1@middle")
  with pytest.raises(ValueError, match="unknown conversation template 'vicuna_v9'"):
    tp.get_template("vicuna_v9@inline")
  with pytest.raises(ValueError, match="applies to the built-in templates only"):
    tp.get_template("hf@inline")
