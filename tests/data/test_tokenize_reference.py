"""Ids and label masks equal the reference implementations', token for token.

LLaVA (haotian-liu/LLaVA 1.2.2.post1: `conversation.py` + `train.py` `preprocess_v1` / `preprocess_llama_2` /
`preprocess_plain`, `mm_utils.tokenizer_image_token`, slow `LlamaTokenizer` of transformers 4.36.2 as LLaVA pins
it): the expected lists below are what that code gives on Mistral-7B's sentencepiece model
(testdata/mistral_v1_tokenizer.model, from the mistral-common package, Apache-2.0) with `legacy` True and False,
one image placeholder per image. They were produced by running that code once, then read and checked by hand
against LLaVA's rules, written here next to each case.

LLaVA-NeXT (LLaVA-VL/LLaVA-NeXT `train.py` `preprocess_qwen` / `preprocess_llama3`) is ported below line by line
(torch and IMAGE_TOKEN_INDEX left out) and run with transformers' own `apply_chat_template` on a byte-level BPE
tokenizer that has the Qwen2 / Llama-3 special tokens, with Meta's Llama-3 template (testdata/chat_templates).
"""

import copy
import os
import random

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llava_jax import tokenizer as tk
from llava_jax.data import templates as tp
from llava_jax.data.tokenize import IGNORE, TokenizedSample, tokenize_conversation

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")
IMG = 9999

CONV = [
    {"from": "human", "value": "What is this?\n<image>"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "Color?"},
    {"from": "gpt", "value": "Black."},
]
TEXT3 = [
    {"from": "human", "value": "Hi"},
    {"from": "gpt", "value": "Hello."},
    {"from": "human", "value": "Color?"},
    {"from": "gpt", "value": "Black."},
    {"from": "human", "value": "Size?"},
    {"from": "gpt", "value": "Big."},
]
SYSTEM = [{"from": "system", "value": "Be brief."}]  # LLaVA: conv.system = "Be brief."
CASES = {"default": (CONV, True), "sys": (SYSTEM + CONV, True), "text3": (SYSTEM + TEXT3, False)}

_SYS = {
    "VICUNA": "<s> ▁A ▁chat ▁between ▁a ▁curious ▁user ▁and ▁an ▁artificial ▁intelligence ▁assistant . ▁The "
    "▁assistant ▁gives ▁helpful , ▁detailed , ▁and ▁polite ▁answers ▁to ▁the ▁user ' s ▁questions .",
    "LLAVA": "<s> ▁A ▁chat ▁between ▁a ▁curious ▁human ▁and ▁an ▁artificial ▁intelligence ▁assistant . ▁The "
    "▁assistant ▁gives ▁helpful , ▁detailed , ▁and ▁polite ▁answers ▁to ▁the ▁human ' s ▁questions .",
    # "safe.  Your": sentencepiece splits the double space as '.', '▁', '▁Your'.
    "LLAMA2": "<s> ▁[ INST ] ▁<< SYS >> <0x0A> You ▁are ▁a ▁helpful , ▁respect ful ▁and ▁honest ▁assistant . "
    "▁Always ▁answer ▁as ▁help fully ▁as ▁possible , ▁while ▁being ▁safe . ▁ ▁Your ▁answers ▁should ▁not "
    "▁include ▁any ▁harmful , ▁un eth ical , ▁racist , ▁sex ist , ▁toxic , ▁dangerous , ▁or ▁illegal "
    "▁content . ▁Please ▁ensure ▁that ▁your ▁responses ▁are ▁soc ially ▁un bi ased ▁and ▁positive ▁in "
    "▁nature . <0x0A> <0x0A> If ▁a ▁question ▁does ▁not ▁make ▁any ▁sense , ▁or ▁is ▁not ▁fact ually ▁co "
    "herent , ▁explain ▁why ▁instead ▁of ▁answering ▁something ▁not ▁correct . ▁If ▁you ▁don ' t ▁know "
    "▁the ▁answer ▁to ▁a ▁question , ▁please ▁don ' t ▁share ▁false ▁information . <0x0A> < </ SYS >> "
    "<0x0A> <0x0A>",
    "LLAVA_LLAMA2": "<s> ▁[ INST ] ▁<< SYS >> <0x0A> You ▁are ▁a ▁helpful ▁language ▁and ▁vision ▁assistant . ▁You "
    "▁are ▁able ▁to ▁understand ▁the ▁visual ▁content ▁that ▁the ▁user ▁provides , ▁and ▁assist "
    "▁the ▁user ▁with ▁a ▁variety ▁of ▁tasks ▁using ▁natural ▁language . <0x0A> < </ SYS >> <0x0A> "
    "<0x0A>",
}

# (template, legacy, case) -> tokens, learned ones in [brackets]. What each encodes:
# - TWO (vicuna_v1, llava_v1): "SYS USER: <image>\nq ASSISTANT: a</s>USER: ..."; learned: " a</s>" (preprocess_v1:
#   instruction_len - 2 drops BOS and the trailing "▁" of "ASSISTANT: "; round_len counts BOS for </s>).
#   legacy=True: "</s>USER" -> '</s>', '▁US', 'ER'; legacy=False: '</s>', 'USER' (preprocess_v1's -1 per round).
# - LLAMA_2 (llama_2, llava_llama_2, mistral_instruct): "[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST] a </s>" + sep;
#   learned " a </s>" ('▁a', ..., '▁', '</s>'); sep "<s>" (llama_2) or "" (mistral_instruct); an empty system
#   text is no <<SYS>> block (wrap_sys). legacy=False: the '[' after '<s>'/'</s>' loses its '▁'.
# - the stretch after <image> is a new tokenizer call (tokenizer_image_token): '▁', '<0x0A>', 'What'.
# - PLAIN: "<image>" + caption + "\n"; learned: the caption's tokens and '\n'.
LLAVA_REFERENCE = {
    ("vicuna_v1", True, "default"): "{VICUNA} ▁US ER : ▁ <IMG> ▁ <0x0A> What ▁is ▁this ? ▁ASS IST ANT : [▁A] [▁cat] "
    "[.] [</s>] ▁US ER : ▁Color ? ▁ASS IST ANT : [▁Black] [.] [</s>]",
    ("vicuna_v1", False, "default"): "{VICUNA} ▁US ER : ▁ <IMG> ▁ <0x0A> What ▁is ▁this ? ▁ASS IST ANT : [▁A] "
    "[▁cat] [.] [</s>] USER : ▁Color ? ▁ASS IST ANT : [▁Black] [.] [</s>]",
    ("llava_v1", True, "default"): "{LLAVA} ▁US ER : ▁ <IMG> ▁ <0x0A> What ▁is ▁this ? ▁ASS IST ANT : [▁A] [▁cat] "
    "[.] [</s>] ▁US ER : ▁Color ? ▁ASS IST ANT : [▁Black] [.] [</s>]",
    ("llava_v1", False, "default"): "{LLAVA} ▁US ER : ▁ <IMG> ▁ <0x0A> What ▁is ▁this ? ▁ASS IST ANT : [▁A] [▁cat] "
    "[.] [</s>] USER : ▁Color ? ▁ASS IST ANT : [▁Black] [.] [</s>]",
    ("llama_2", True, "default"): "{LLAMA2} <IMG> ▁ <0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] [.] [▁] [</s>] "
    "<s> ▁[ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("llama_2", False, "default"): "{LLAMA2} <IMG> ▁ <0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] [.] [▁] [</s>] "
    "<s> [ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("llava_llama_2", True, "default"): "{LLAVA_LLAMA2} <IMG> ▁ <0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] [.] "
    "[▁] [</s>] <s> ▁[ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("llava_llama_2", False, "default"): "{LLAVA_LLAMA2} <IMG> ▁ <0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] "
    "[.] [▁] [</s>] <s> [ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("mistral_instruct", True, "default"): "<s> ▁[ INST ] ▁ <IMG> ▁ <0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] "
    "[.] [▁] [</s>] ▁[ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("mistral_instruct", False, "default"): "<s> ▁[ INST ] ▁ <IMG> ▁ <0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] "
    "[▁cat] [.] [▁] [</s>] [ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] [▁] "
    "[</s>]",
    ("plain", True, "default"): "<s> <IMG> [▁A] [▁cat] [.] [<0x0A>]",
    ("plain", False, "default"): "<s> <IMG> [▁A] [▁cat] [.] [<0x0A>]",
    ("vicuna_v1", True, "sys"): "<s> ▁Be ▁brief . ▁US ER : ▁ <IMG> ▁ <0x0A> What ▁is ▁this ? ▁ASS IST ANT : [▁A] "
    "[▁cat] [.] [</s>] ▁US ER : ▁Color ? ▁ASS IST ANT : [▁Black] [.] [</s>]",
    ("vicuna_v1", False, "sys"): "<s> ▁Be ▁brief . ▁US ER : ▁ <IMG> ▁ <0x0A> What ▁is ▁this ? ▁ASS IST ANT : [▁A] "
    "[▁cat] [.] [</s>] USER : ▁Color ? ▁ASS IST ANT : [▁Black] [.] [</s>]",
    ("vicuna_v1", True, "text3"): "<s> ▁Be ▁brief . ▁US ER : ▁Hi ▁ASS IST ANT : [▁Hello] [.] [</s>] ▁US ER : "
    "▁Color ? ▁ASS IST ANT : [▁Black] [.] [</s>] ▁US ER : ▁Size ? ▁ASS IST ANT : "
    "[▁Big] [.] [</s>]",
    ("vicuna_v1", False, "text3"): "<s> ▁Be ▁brief . ▁US ER : ▁Hi ▁ASS IST ANT : [▁Hello] [.] [</s>] USER : "
    "▁Color ? ▁ASS IST ANT : [▁Black] [.] [</s>] USER : ▁Size ? ▁ASS IST ANT : "
    "[▁Big] [.] [</s>]",
    ("llama_2", True, "sys"): "<s> ▁[ INST ] ▁<< SYS >> <0x0A> Be ▁brief . <0x0A> < </ SYS >> <0x0A> <0x0A> <IMG> ▁ "
    "<0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] [.] [▁] [</s>] <s> ▁[ INST ] ▁Color "
    "? ▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("llama_2", False, "sys"): "<s> ▁[ INST ] ▁<< SYS >> <0x0A> Be ▁brief . <0x0A> < </ SYS >> <0x0A> <0x0A> <IMG> ▁ "
    "<0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] [.] [▁] [</s>] <s> [ INST ] ▁Color ? "
    "▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("llama_2", True, "text3"): "<s> ▁[ INST ] ▁<< SYS >> <0x0A> Be ▁brief . <0x0A> < </ SYS >> <0x0A> <0x0A> Hi ▁[ "
    "/ INST ] [▁Hello] [.] [▁] [</s>] <s> ▁[ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] "
    "[▁] [</s>] <s> ▁[ INST ] ▁Size ? ▁[ / INST ] [▁Big] [.] [▁] [</s>]",
    ("llama_2", False, "text3"): "<s> ▁[ INST ] ▁<< SYS >> <0x0A> Be ▁brief . <0x0A> < </ SYS >> <0x0A> <0x0A> Hi ▁[ "
    "/ INST ] [▁Hello] [.] [▁] [</s>] <s> [ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] "
    "[▁] [</s>] <s> [ INST ] ▁Size ? ▁[ / INST ] [▁Big] [.] [▁] [</s>]",
    ("mistral_instruct", True, "sys"): "<s> ▁[ INST ] ▁<< SYS >> <0x0A> Be ▁brief . <0x0A> < </ SYS >> <0x0A> <0x0A> "
    "<IMG> ▁ <0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] [.] [▁] [</s>] ▁[ "
    "INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("mistral_instruct", False, "sys"): "<s> ▁[ INST ] ▁<< SYS >> <0x0A> Be ▁brief . <0x0A> < </ SYS >> <0x0A> "
    "<0x0A> <IMG> ▁ <0x0A> What ▁is ▁this ? ▁[ / INST ] [▁A] [▁cat] [.] [▁] "
    "[</s>] [ INST ] ▁Color ? ▁[ / INST ] [▁Black] [.] [▁] [</s>]",
    ("mistral_instruct", True, "text3"): "<s> ▁[ INST ] ▁<< SYS >> <0x0A> Be ▁brief . <0x0A> < </ SYS >> <0x0A> "
    "<0x0A> Hi ▁[ / INST ] [▁Hello] [.] [▁] [</s>] ▁[ INST ] ▁Color ? ▁[ / "
    "INST ] [▁Black] [.] [▁] [</s>] ▁[ INST ] ▁Size ? ▁[ / INST ] [▁Big] [.] "
    "[▁] [</s>]",
    ("mistral_instruct", False, "text3"): "<s> ▁[ INST ] ▁<< SYS >> <0x0A> Be ▁brief . <0x0A> < </ SYS >> <0x0A> "
    "<0x0A> Hi ▁[ / INST ] [▁Hello] [.] [▁] [</s>] [ INST ] ▁Color ? ▁[ / INST "
    "] [▁Black] [.] [▁] [</s>] [ INST ] ▁Size ? ▁[ / INST ] [▁Big] [.] [▁] "
    "[</s>]",
}


@pytest.fixture(scope="module")
def mistral():
  with open(os.path.join(TESTDATA, "mistral_v1_tokenizer.model"), "rb") as f:
    proto = f.read()
  return {legacy: tk.SentencePieceTokenizer(proto, legacy=legacy) for legacy in (True, False)}


def _marked(tokenizer, r: TokenizedSample) -> str:
  return " ".join(
      ("[" + tokenizer.id_to_token(i) + "]") if label != IGNORE else ("<IMG>" if i == IMG else tokenizer.id_to_token(i))
      for i, label in zip(r.input_ids, r.labels)
  )


@pytest.mark.parametrize("key", sorted(LLAVA_REFERENCE), ids=lambda k: "-".join(map(str, k)))
def test_llava_ids_and_masks_on_mistral_sentencepiece(mistral, key):
  template, legacy, case = key
  conv, has_image = CASES[case]
  if template == "plain":
    conv = CONV[:2]
  sample = {"id": "-".join(map(str, key)), "conversations": conv, **({"image": "x.jpg"} if has_image else {})}
  r = tokenize_conversation(sample, mistral[legacy], template, image_token_id=IMG, num_image_tokens=1, max_len=4096)
  assert isinstance(r, TokenizedSample), r
  assert _marked(mistral[legacy], r) == LLAVA_REFERENCE[key].format(**_SYS)


def test_legacy_changes_exactly_one_token_per_later_round(mistral):
  """The issue's example: vicuna_v1 with a legacy=False tokenizer differs from legacy=True at each '</s>USER'."""
  sample = {"id": "t3", "conversations": SYSTEM + TEXT3}
  a, b = (
      tokenize_conversation(sample, mistral[legacy], "vicuna_v1", image_token_id=IMG, num_image_tokens=1, max_len=4096)
      for legacy in (True, False)
  )
  assert len(a.input_ids) == len(b.input_ids) + 2  # '▁US', 'ER' -> 'USER' in rounds 2 and 3
  assert a.num_target_tokens == b.num_target_tokens == 9


# ----------------------------------------------------------------------------- LLaVA-NeXT, ported


def preprocess_multimodal(sources):
  """LLaVA-NeXT train.py preprocess_multimodal (is_multimodal, no mm_use_im_start_end, no mmtag)."""
  for source in sources:
    for sentence in source:
      num_im = sentence["value"].count("<image>")
      if num_im == 1 and "<image>" in sentence["value"] and not sentence["value"].startswith("<image>"):
        sentence["value"] = sentence["value"].replace("<image>", "").strip()
        sentence["value"] = "<image>" + "\n" + sentence["value"]
        sentence["value"] = sentence["value"].strip()
  return sources


def _apply(tokenizer, messages) -> list[int]:
  """`tokenizer.apply_chat_template(messages)` as transformers 4.x returned it (ids; 5.x returns a dict)."""
  return list(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])


def preprocess_qwen(sources, tokenizer, has_image=False, system_message="You are a helpful assistant."):
  """LLaVA-NeXT train.py preprocess_qwen, line by line (one source; Qwen2's "\\n" id 198 taken from the tokenizer)."""
  roles = {"human": "user", "gpt": "assistant"}
  tokenizer = copy.deepcopy(tokenizer)
  if has_image:
    tokenizer.add_tokens(["<image>"], special_tokens=True)
  image_token_index = tokenizer.convert_tokens_to_ids("<image>")
  im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])  # additional_special_tokens_ids
  unmask_tokens_idx = [tokenizer("\n").input_ids[0], im_start, im_end]  # [198, im_start, im_end] in Qwen2
  chat_template = (
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
      "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
      "{% endif %}"
  )
  tokenizer.chat_template = chat_template
  source = sources[0]
  if roles[source[0]["from"]] != roles["human"]:
    source = source[1:]
  input_id, target = [], []
  input_id += _apply(tokenizer, [{"role": "system", "content": system_message}])
  target += [IGNORE] * len(input_id)
  for conv in source:
    role, content = conv["from"], conv["value"]
    role = roles.get(role, role)
    conv = [{"role": role, "content": content}]
    encode_id = _apply(tokenizer, conv)
    input_id += encode_id
    if role in ["user", "system"]:
      target += [IGNORE] * len(encode_id)
    else:
      target += encode_id
  for idx, encode_id in enumerate(input_id):
    if encode_id in unmask_tokens_idx:
      target[idx] = encode_id
    if encode_id == image_token_index:
      input_id[idx] = IMG
  return input_id, target


def preprocess_llama3(sources, tokenizer, has_image=False, system_message=tp._LLAVA_SYSTEM):
  """LLaVA-NeXT train.py preprocess_llama3, line by line (one source)."""
  roles = {"human": "user", "gpt": "assistant"}
  tokenizer = copy.deepcopy(tokenizer)
  if has_image:
    tokenizer.add_tokens(["<image>"], special_tokens=True)
  image_token_index = tokenizer.convert_tokens_to_ids("<image>")
  unmask_tokens = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n"]
  unmask_tokens_idx = [tokenizer.convert_tokens_to_ids(tok) for tok in unmask_tokens]  # "\n\n" -> None: no entry
  source = sources[0]
  if roles[source[0]["from"]] != roles["human"]:
    source = source[1:]
  input_id, target = [], []
  input_id += _apply(tokenizer, [{"role": "system", "content": system_message}])
  target += [IGNORE] * len(input_id)
  for conv in source:
    role, content = conv["from"], conv["value"]
    role = roles.get(role, role)
    conv = [{"role": role, "content": content}]
    encode_id = _apply(tokenizer, conv)[1:]  # "First is bos token we don't need here"
    input_id += encode_id
    if role in ["user", "system"]:
      target += [IGNORE] * len(encode_id)
    else:
      target += encode_id
  for idx, encode_id in enumerate(input_id):
    if encode_id in unmask_tokens_idx:
      target[idx] = encode_id
    if encode_id == image_token_index:
      input_id[idx] = IMG
  return input_id, target


SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
WORDS = "the a dog cat runs sits on mat red blue what is this color of picture black white man yes no".split()


@pytest.fixture(scope="module")
def bpe():
  """(tokenizers.Tokenizer, transformers fast tokenizer for Qwen2, for Llama-3): byte-level BPE, no BOS for Qwen."""
  transformers = pytest.importorskip("transformers")
  rng = random.Random(0)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  sents = [
      " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + rng.choice([".", "?", "\n", "\n\n"])
      for _ in range(800)
  ]
  tok.train_from_iterator(
      sents,
      trainers.BpeTrainer(
          vocab_size=400,
          show_progress=False,
          special_tokens=SPECIALS,
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      ),
  )
  qwen = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  llama3 = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
  )
  with open(os.path.join(TESTDATA, "chat_templates", "llama3.jinja")) as f:
    llama3.chat_template = f.read()
  return tok, qwen, llama3


def _random_conversation(rng, with_image):
  words = ["cat", "dog", "What", "is", "it?", "Yes.", "no", "red\nblue", " big ", "a\n\nb"]
  n = rng.randint(1, 3)
  conv = []
  for k in range(n):
    conv.append({"from": "human", "value": " ".join(rng.choices(words, k=rng.randint(1, 5)))})
    conv.append({"from": "gpt", "value": " ".join(rng.choices(words, k=rng.randint(1, 5))).strip() or "ok"})
  if with_image:  # at the start or the end of a user turn
    k = rng.randrange(0, len(conv), 2)
    value = conv[k]["value"]
    conv[k] = {**conv[k], "value": rng.choice(["<image>\n" + value, value + " <image>"])}
  return conv


@pytest.mark.parametrize("name", ["chatml_llava_next", "llama3_llava_next"])
def test_llava_next_ids_and_masks_equal_its_preprocess(bpe, name):
  tok, qwen, llama3 = bpe
  rng = random.Random(1)
  eos = "<|im_end|>" if name.startswith("chatml") else "<|eot_id|>"
  bos = None if name.startswith("chatml") else "<|begin_of_text|>"
  ours = tk.HFTokenizer(tok, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>")
  for trial in range(40):
    with_image = trial % 2 == 0
    conv = _random_conversation(rng, with_image)
    sources = preprocess_multimodal([copy.deepcopy(conv)]) if with_image else [copy.deepcopy(conv)]
    if name.startswith("chatml"):
      ids, labels = preprocess_qwen(sources, qwen, has_image=with_image)
    else:
      ids, labels = preprocess_llama3(sources, llama3, has_image=with_image)
    sample = {"id": f"r{trial}", "conversations": conv, **({"image": "x.jpg"} if with_image else {})}
    r = tokenize_conversation(sample, ours, name, image_token_id=IMG, num_image_tokens=1, max_len=4096)
    assert isinstance(r, TokenizedSample), r
    assert r.input_ids.tolist() == ids, (trial, conv)
    assert r.labels.tolist() == labels, (trial, conv)


def test_llava_next_masks_by_hand(bpe):
  """Which tokens LLaVA-NeXT's Qwen preprocess learns: whole answers and every <|im_start|>, <|im_end|>, '\\n'."""
  tok, _, _ = bpe
  ours = tk.HFTokenizer(tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  sample = {"id": "q", "image": "x.jpg", "conversations": CONV[:2]}
  r = tokenize_conversation(sample, ours, "chatml_llava_next", image_token_id=IMG, num_image_tokens=1, max_len=99)
  marked, run = "", None  # learned runs in [brackets]
  for i, label in zip(r.input_ids, r.labels):
    learned = label != IGNORE
    if learned != run:
      marked += "[" if learned else ("]" if run else "")
      run = learned
    marked += "IMG" if i == IMG else ours.decode([int(i)], skip_special_tokens=False)
  assert marked + ("]" if run else "") == (
      "[<|im_start|>]system[\n]You are a helpful assistant.[<|im_end|>\n<|im_start|>]user[\n]IMG[\n]What is this?"
      "[<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n]"
  )
  r = tokenize_conversation(sample, ours, "chatml", image_token_id=IMG, num_image_tokens=1, max_len=99)
  assert [ours.decode([i], skip_special_tokens=False) for i, l in zip(r.input_ids, r.labels) if l != IGNORE] == [
      "A",
      " cat",
      ".",
      "<|im_end|>",
      "\n",
  ]
