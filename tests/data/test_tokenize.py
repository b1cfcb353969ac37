"""Label masking per template on tiny sentencepiece / WordLevel / byte-level BPE tokenizers, and every rejection."""

import dataclasses
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llava_jax import tokenizer as tk
from llava_jax.data import templates as tp
from llava_jax.data.tokenize import (
    IGNORE,
    Rejected,
    RejectReason,
    TokenizedSample,
    apply_policy,
    tokenize_conversation,
    tokenize_prompt,
)

IMG = 9999  # image_token_id: outside every test vocabulary, like HF LLaVA's added <image> id
N_IMG = 3

CONV = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "What is this?\n<image>"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "Color?"},
    {"from": "gpt", "value": "Black."},
]
SAMPLE = {"id": "s-1", "image": "cat.jpg", "conversations": CONV}
PLAIN = {"id": "p-1", "image": "cat.jpg", "conversations": CONV[1:3]}
WORDS = (
    "the a dog cat runs sits on mat red blue big small what is in this yes no color of picture black white "
    "man woman holding describe"
).split()


def _rendered_texts():
  out = []
  for name in tp.TEMPLATES:
    sample = PLAIN if name == "plain" else SAMPLE
    out.append("".join(s.text for s in tp.render(sample["conversations"], name)))
  return out


@pytest.fixture(scope="module")
def sp():
  rng = random.Random(0)
  sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!") for _ in range(2000)]
  sents += [t.replace("<image>", "") for t in _rendered_texts()]  # so every character has a piece
  return tk.train_sentencepiece(
      sents,
      200,
      user_defined_symbols=[
          "\n",
          "<|im_start|>",
          "<|im_end|>",
          "<start_of_turn>",
          "<end_of_turn>",
          "<|start_header_id|>",
          "<|end_header_id|>",
          "<|eot_id|>",
      ],
  )


@pytest.fixture(scope="module")
def wl():
  """WordLevel + Whitespace pre-tokenizer: one token per word / punctuation run, whitespace dropped."""
  specials = [
      "<unk>",
      "<s>",
      "</s>",
      "<pad>",
      "<|im_start|>",
      "<|im_end|>",
      "<start_of_turn>",
      "<end_of_turn>",
      "<|begin_of_text|>",
      "<|start_header_id|>",
      "<|end_header_id|>",
      "<|eot_id|>",
  ]
  words = []
  for text in _rendered_texts():
    words += [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.replace("<image>", " "))]
  vocab = {}
  for w in specials + words:
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials)
  return tk.HFTokenizer(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", name="wordlevel")


@pytest.fixture(scope="module")
def bpe():
  """Qwen2-like byte-level BPE without BOS."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  rng = random.Random(1)
  sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(1000)] + _rendered_texts()
  tok.train_from_iterator(
      sents,
      trainers.BpeTrainer(
          vocab_size=400,
          show_progress=False,
          special_tokens=[
              "<|endoftext|>",
              "<|im_start|>",
              "<|im_end|>",
              "<|start_header_id|>",
              "<|end_header_id|>",
              "<|eot_id|>",
          ],
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      ),
  )
  return tk.HFTokenizer(tok, bos_token=None, eos_token="<|im_end|>", name="bpe")


def _tok(sample, tokenizer, template, max_len=4096, **kw):
  return tokenize_conversation(
      sample, tokenizer, template, image_token_id=IMG, num_image_tokens=N_IMG, max_len=max_len, **kw
  )


def _strings(tokenizer, ids):
  return ["IMG" if i == IMG else tokenizer.id_to_token(i) for i in ids]


def _targets(tokenizer, r):
  """Learned tokens as strings, one list per contiguous run."""
  runs, cur = [], []
  for i, l in zip(r.input_ids, r.labels):
    if l != IGNORE:
      assert l == i
      cur.append(tokenizer.id_to_token(l))
    elif cur:
      runs.append(cur)
      cur = []
  return runs + ([cur] if cur else [])


# Hand-written: the whole token sequence (WordLevel drops whitespace) and the learned runs.
WL_EXPECTED = {
    "vicuna_v1": (
        "<s> Be brief . USER : IMG IMG IMG What is this ? ASSISTANT : A cat . </s> "
        "USER : Color ? ASSISTANT : Black . </s>",
        [["A", "cat", ".", "</s>"], ["Black", ".", "</s>"]],
    ),
    "llava_v1": (
        "<s> Be brief . USER : IMG IMG IMG What is this ? ASSISTANT : A cat . </s> "
        "USER : Color ? ASSISTANT : Black . </s>",
        [["A", "cat", ".", "</s>"], ["Black", ".", "</s>"]],
    ),
    "llama_2": (
        "<s> [ INST ] << SYS >> Be brief . <</ SYS >> IMG IMG IMG What is this ? [/ INST ] A cat . </s> "
        "<s> [ INST ] Color ? [/ INST ] Black . </s>",
        [["A", "cat", ".", "</s>"], ["Black", ".", "</s>"]],
    ),
    "llava_llama_2": (
        "<s> [ INST ] << SYS >> Be brief . <</ SYS >> IMG IMG IMG What is this ? [/ INST ] A cat . </s> "
        "<s> [ INST ] Color ? [/ INST ] Black . </s>",
        [["A", "cat", ".", "</s>"], ["Black", ".", "</s>"]],
    ),
    "mistral_instruct": (
        "<s> [ INST ] << SYS >> Be brief . <</ SYS >> IMG IMG IMG What is this ? [/ INST ] A cat . "
        "</s> [ INST ] Color ? [/ INST ] Black . </s>",
        [["A", "cat", ".", "</s>"], ["Black", ".", "</s>"]],
    ),
    "llama3": (
        "<s> <|start_header_id|> system <|end_header_id|> Be brief . <|eot_id|> <|start_header_id|> user "
        "<|end_header_id|> IMG IMG IMG What is this ? <|eot_id|> <|start_header_id|> assistant "
        "<|end_header_id|> "
        "A cat . <|eot_id|> <|start_header_id|> user <|end_header_id|> Color ? <|eot_id|> <|start_header_id|> "
        "assistant <|end_header_id|> Black . <|eot_id|>",
        [["A", "cat", ".", "<|eot_id|>"], ["Black", ".", "<|eot_id|>"]],
    ),
    "chatml": (
        "<|im_start|> system Be brief . <|im_end|> <|im_start|> user IMG IMG IMG What is this ? <|im_end|> "
        "<|im_start|> assistant A cat . <|im_end|> <|im_start|> user Color ? <|im_end|> "
        "<|im_start|> assistant Black . <|im_end|>",
        [["A", "cat", ".", "<|im_end|>"], ["Black", ".", "<|im_end|>"]],
    ),
    "gemma": (
        "<s> <start_of_turn> user Be brief . IMG IMG IMG What is this ? <end_of_turn> <start_of_turn> model "
        "A cat . <end_of_turn> <start_of_turn> user Color ? <end_of_turn> <start_of_turn> model "
        "Black . <end_of_turn>",
        [["A", "cat", ".", "<end_of_turn>"], ["Black", ".", "<end_of_turn>"]],
    ),
    "plain": ("<s> IMG IMG IMG A cat .", [["A", "cat", "."]]),
}


# LLaVA-NeXT: learned tokens in [brackets] (also the structural ones of user and system turns).
WL_MARKED = {
    "llama3_llava_next": "<s> [<|start_header_id|>] system [<|end_header_id|>] Be brief . [<|eot_id|>] "
    "[<|start_header_id|>] user [<|end_header_id|>] IMG IMG IMG What is this ? [<|eot_id|>] "
    "[<|start_header_id|>] [assistant] [<|end_header_id|>] [A] [cat] [.] [<|eot_id|>] "
    "[<|start_header_id|>] user [<|end_header_id|>] Color ? [<|eot_id|>] [<|start_header_id|>] "
    "[assistant] [<|end_header_id|>] [Black] [.] [<|eot_id|>]",
    # "\n" is learned too where it is a token of its own; WordLevel drops whitespace.
    "chatml_llava_next": "[<|im_start|>] system Be brief . [<|im_end|>] [<|im_start|>] user IMG IMG IMG What is this ? "
    "[<|im_end|>] [<|im_start|>] [assistant] [A] [cat] [.] [<|im_end|>] [<|im_start|>] user Color "
    "? [<|im_end|>] [<|im_start|>] [assistant] [Black] [.] [<|im_end|>]",
}


def test_every_template_has_a_wordlevel_expectation():
  assert set(WL_EXPECTED) | set(WL_MARKED) == set(tp.TEMPLATES)


@pytest.mark.parametrize("name", sorted(WL_MARKED))
def test_wordlevel_learned_tokens_by_hand(wl, name):
  r = _tok(SAMPLE, wl, name, add_bos=not name.startswith("chatml"))
  assert isinstance(r, TokenizedSample), r
  marked = [
      "IMG" if i == IMG else (f"[{wl.id_to_token(i)}]" if l != IGNORE else wl.id_to_token(i))
      for i, l in zip(r.input_ids, r.labels)
  ]
  assert " ".join(marked) == WL_MARKED[name]


@pytest.mark.parametrize("name", sorted(WL_EXPECTED))
def test_wordlevel_masks_by_hand(wl, name):
  tokens, targets = WL_EXPECTED[name]
  r = _tok(PLAIN if name == "plain" else SAMPLE, wl, name, add_bos=name != "chatml")
  assert isinstance(r, TokenizedSample), r
  assert r.input_ids.dtype == np.int32 and r.labels.dtype == np.int32 and r.input_ids.shape == r.labels.shape
  assert _strings(wl, r.input_ids) == tokens.split()
  assert _targets(wl, r) == targets
  assert r.num_images == 1 and not r.truncated
  assert (r.labels[r.input_ids == IMG] == IGNORE).all()


def test_sentencepiece_vicuna_by_hand(sp):
  r = _tok(SAMPLE, sp, "vicuna_v1")
  pieces = _strings(sp, r.input_ids)
  # A dummy prefix at the text start and after the image (LLaVA's tokenizer_image_token), none elsewhere.
  assert "".join(pieces) == (
      "<s>▁Be▁brief.▁USER:▁IMGIMGIMG▁\nWhat▁is▁this?▁ASSISTANT:▁A▁cat.</s>▁USER:▁Color?▁ASSISTANT:▁Black.</s>"
  )
  assert ["".join(run) for run in _targets(sp, r)] == ["▁A▁cat.</s>", "▁Black.</s>"]


@pytest.mark.parametrize("name", sorted(n for n, t in tp.TEMPLATES.items() if not t.learned_tokens))
def test_sentencepiece_targets_are_the_answer_text(sp, name):
  """Each learned run spells exactly the template's target segment (spaces as ▁).

  (LLaVA-NeXT's templates also learn structural tokens of other turns: test_tokenize_reference.py.)"""
  sample = PLAIN if name == "plain" else SAMPLE
  r = _tok(sample, sp, name)
  assert isinstance(r, TokenizedSample), r
  want = [s.text.replace(" ", "▁") for s in tp.render(sample["conversations"], name) if s.is_target]
  if name == "plain":
    want = ["▁" + w for w in want]  # the caption starts a stretch after <image>: dummy prefix
  assert ["".join(run) for run in _targets(sp, r)] == want
  assert r.input_ids[0] == sp.bos_id


def test_byte_level_bpe_chatml(bpe):
  r = _tok(SAMPLE, bpe, "chatml")
  assert isinstance(r, TokenizedSample), r
  assert r.input_ids[0] == bpe.token_to_id("<|im_start|>")  # no BOS for a tokenizer without one
  runs = [[bpe.token_to_id(t) for t in run] for run in _targets(bpe, r)]
  assert [bpe.decode(run, skip_special_tokens=False) for run in runs] == ["A cat.<|im_end|>\n", "Black.<|im_end|>\n"]
  text = "".join(s.text for s in tp.render(CONV, "chatml"))
  assert bpe.decode([i for i in r.input_ids if i != IMG], skip_special_tokens=False) == text.replace("<image>", "")


@pytest.mark.parametrize("name", sorted(tp.TEMPLATES))
def test_generation_prompt_tokens_equal_training_context(sp, wl, bpe, name):
  """What the model sees at inference before answer k is exactly the training input before answer k."""
  sample = PLAIN if name == "plain" else SAMPLE
  conv = sample["conversations"]
  for tok in (sp, wl, bpe):
    r = _tok(sample, tok, name)
    t = tp.TEMPLATES[name]
    starts = [i for i in range(len(r.labels)) if r.labels[i] != IGNORE and (i == 0 or r.labels[i - 1] == IGNORE)]
    user_turns = [k for k, turn in enumerate(conv) if turn["from"] == "human"]
    if not t.learned_tokens:
      assert len(starts) == len(user_turns)
    for j, k in enumerate(user_turns):
      prompt = tp.prompt_for_generation(conv[: k + 1], name)
      ids = tokenize_prompt(prompt, tok, image_token_id=IMG, num_image_tokens=N_IMG)
      assert ids.dtype == np.int32
      np.testing.assert_array_equal(ids, r.input_ids[: len(ids)], err_msg=f"{name} {tok.name} turn {k}")
      if not t.learned_tokens:  # the answer's learned tokens start right after the generation prompt
        assert starts[j] == len(ids), (name, tok.name, k)


def test_template_mismatch_token_straddles_boundary(wl):
  tight = dataclasses.replace(tp.TEMPLATES["vicuna_v1"], name="tight", assistant_format="{content}</s>")
  sample = {"id": "smiley", "conversations": [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "::)"}]}
  r = _tok(sample, wl, tight)
  assert isinstance(r, Rejected) and r.reason == RejectReason.TEMPLATE_MISMATCH and r.sample_id == "smiley"
  # whole text: "ASSISTANT:::)" -> "ASSISTANT", ":::)" (unknown); prefix: "ASSISTANT", ":"
  assert "ASSISTANT:' | '::)</s>')" in r.detail and "['?', 'ASSISTANT', ':']" in r.detail, r.detail
  # the same answer with a space in between is fine
  assert isinstance(_tok(sample, wl, "vicuna_v1"), TokenizedSample)


def test_template_mismatch_bad_turns(wl):
  bad = {"id": "b-2", "conversations": [CONV[1], CONV[1], CONV[2]], "image": ["a", "b"]}
  r = _tok(bad, wl, "vicuna_v1")
  assert r.reason == RejectReason.TEMPLATE_MISMATCH and "alternate" in r.detail
  r = _tok(SAMPLE, wl, "plain")  # plain takes exactly one question and one caption
  assert r.reason == RejectReason.TEMPLATE_MISMATCH and "plain" in r.detail
  assert _tok({"id": "x", "conversations": "hi"}, wl, "vicuna_v1").reason == RejectReason.TEMPLATE_MISMATCH


def test_image_count_mismatch(wl):
  no_image = {k: v for k, v in SAMPLE.items() if k != "image"}
  r = _tok(no_image, wl, "vicuna_v1")
  assert r.reason == RejectReason.IMAGE_COUNT_MISMATCH and "1 <image> tags" in r.detail and "0 images" in r.detail
  two = {**SAMPLE, "image": ["a.jpg", "b.jpg"]}
  assert _tok(two, wl, "vicuna_v1").reason == RejectReason.IMAGE_COUNT_MISMATCH
  # a text token that collides with image_token_id would be merged as an image feature
  r = tokenize_conversation(
      SAMPLE, wl, "vicuna_v1", image_token_id=wl.token_to_id("cat"), num_image_tokens=2, max_len=100
  )
  assert r.reason == RejectReason.IMAGE_COUNT_MISMATCH and "image_token_id" in r.detail
  # text-only samples are fine
  text_only = {"id": "t", "conversations": [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Black."}]}
  r = _tok(text_only, wl, "vicuna_v1")
  assert isinstance(r, TokenizedSample) and r.num_images == 0 and IMG not in r.input_ids


def test_truncation(wl):
  full = _tok(SAMPLE, wl, "vicuna_v1")
  first_target = int(np.argmax(full.labels != IGNORE))
  r = _tok(SAMPLE, wl, "vicuna_v1", max_len=first_target)
  assert r.reason == RejectReason.TRUNCATED_NO_TARGET and f"max_len {first_target}" in r.detail
  r = _tok(SAMPLE, wl, "vicuna_v1", max_len=first_target + 1)
  assert isinstance(r, TokenizedSample) and r.truncated and len(r.input_ids) == first_target + 1
  assert _targets(wl, r) == [["A"]]
  # an image in a later turn that max_len cuts into, while an answer survives
  late = {
      "id": "late",
      "image": "x.jpg",
      "conversations": [
          {"from": "human", "value": "Color?"},
          {"from": "gpt", "value": "Black."},
          {"from": "human", "value": "<image>\nWhat is this?"},
          {"from": "gpt", "value": "A cat."},
      ],
  }
  full = _tok(late, wl, "vicuna_v1")
  img_start = int(np.argmax(full.input_ids == IMG))
  r = _tok(late, wl, "vicuna_v1", max_len=img_start + 1)
  assert r.reason == RejectReason.TRUNCATED_IMAGE and "image 0 of 1" in r.detail
  # cutting the whole image off is rejected too: its pixels would have no placeholders to go to
  assert _tok(late, wl, "vicuna_v1", max_len=img_start).reason == RejectReason.TRUNCATED_IMAGE
  r = _tok(late, wl, "vicuna_v1", max_len=img_start + N_IMG)
  assert isinstance(r, TokenizedSample) and r.truncated and r.num_images == 1
  assert _targets(wl, r) == [["Black", ".", "</s>"]]


def test_no_target(wl):
  r = _tok({"id": "q", "conversations": [{"from": "human", "value": "Color?"}]}, wl, "vicuna_v1")
  assert r.reason == RejectReason.NO_TARGET and r.sample_id == "q"
  assert _tok({"id": "e", "conversations": []}, wl, "vicuna_v1").reason == RejectReason.NO_TARGET


def test_apply_policy():
  counters = {}
  ok = TokenizedSample("a", np.zeros(2, np.int32), np.array([IGNORE, 1], np.int32), 0)
  assert apply_policy(ok, "skip", counters) is ok and counters == {}
  bad = Rejected("id-17", RejectReason.NO_TARGET, "nothing")
  assert apply_policy(bad, "skip", counters) is None
  assert apply_policy(Rejected("img-3", RejectReason.BAD_IMAGE, "truncated jpeg"), "skip", counters) is None
  assert counters == {"no_target": 1, "bad_image": 1}
  with pytest.raises(ValueError, match=r"sample 'id-17' rejected \(no_target\): nothing"):
    apply_policy(bad, "raise", counters)
  assert counters["no_target"] == 2
  with pytest.raises(ValueError, match="policy"):
    apply_policy(bad, "ignore", counters)


def test_never_all_ignore_and_invariants(sp, wl, bpe):
  rng = random.Random(0)
  answers = ["A cat.", "Black.", "yes", "no", "the dog is red", "", "a big white picture"]
  questions = ["Color?", "What is this?", "describe", "is it big?"]
  seen = {}
  for trial in range(150):
    name = rng.choice(sorted(tp.TEMPLATES))
    n_rounds = 1 if name == "plain" else rng.randint(0, 3)
    conv = []
    for k in range(n_rounds):
      conv += [{"from": "human", "value": rng.choice(questions)}, {"from": "gpt", "value": rng.choice(answers)}]
    if rng.random() < 0.3:
      conv.append({"from": "human", "value": "Color?"})
    n_img = rng.choice([0, 1, 1, 2]) if conv else 0
    if n_img:
      k = rng.randrange(0, len(conv), 2)
      conv[k] = {**conv[k], "value": conv[k]["value"] + " <image>" * n_img}
    sample = {"id": f"r{trial}", "conversations": conv, **({"image": ["x"] * n_img} if n_img else {})}
    tok = rng.choice([sp, wl, bpe])
    max_len = rng.choice([4, 12, 30, 4096])
    r = _tok(sample, tok, name, max_len=max_len)
    seen[getattr(r, "reason", "ok")] = seen.get(getattr(r, "reason", "ok"), 0) + 1
    if isinstance(r, Rejected):
      assert r.sample_id == f"r{trial}" and r.detail
      continue
    assert (r.labels != IGNORE).any(), sample
    assert len(r.input_ids) <= max_len
    learned = r.labels != IGNORE
    np.testing.assert_array_equal(r.labels[learned], r.input_ids[learned])
    assert not (learned & (r.input_ids == IMG)).any()
    assert (r.input_ids == IMG).sum() == N_IMG * r.num_images
  assert seen["ok"] > 20 and len(seen) >= 5, seen
  assert seen[RejectReason.EMPTY_ANSWER] > 0, seen


def test_empty_answer_is_rejected_naming_the_turn(wl):
  """An assistant turn with no text would train the end token alone ("</s>" right after "ASSISTANT:")."""
  for value, what in (("", "empty"), ("  \n ", "whitespace only")):
    conv = CONV[1:4] + [{"from": "gpt", "value": value}]
    r = _tok({"id": "e-1", "image": "x.jpg", "conversations": conv}, wl, "vicuna_v1")
    assert isinstance(r, Rejected) and r.reason == RejectReason.EMPTY_ANSWER and r.sample_id == "e-1", r
    assert r.detail == f"turn 3 (assistant) is {what}: it would train the end token alone"
  caption = {"id": "c", "image": "x.jpg", "conversations": [CONV[1], {"from": "gpt", "value": " "}]}
  assert _tok(caption, wl, "plain").reason == RejectReason.EMPTY_ANSWER
  # a leading assistant turn is dropped before training (as LLaVA does), so it may be empty
  lead = {"id": "l", "image": "x.jpg", "conversations": [{"from": "gpt", "value": ""}] + CONV[1:3]}
  assert isinstance(_tok(lead, wl, "vicuna_v1"), TokenizedSample)
  counters = {}
  assert apply_policy(_tok({**lead, "conversations": conv}, wl, "vicuna_v1"), "skip", counters) is None
  assert counters == {"empty_answer": 1}


def test_inline_images_stay_between_the_text(wl):
  """With "@inline" each image's features sit where its tag is: the first image's tokens
  follow "Black", the second's follow "Color"; "vicuna_v1" puts both before the text."""
  two = {
      "id": "two",
      "image": ["a.jpg", "b.jpg"],
      "conversations": [
          {"from": "human", "value": "Black <image> Color <image> Color?"},
          {"from": "gpt", "value": "Black."},
      ],
  }
  inline = _tok(two, wl, "vicuna_v1@inline")
  front = _tok(two, wl, "vicuna_v1")
  assert isinstance(inline, TokenizedSample) and isinstance(front, TokenizedSample)
  assert inline.num_images == front.num_images == 2
  s = _strings(wl, inline.input_ids)
  first, second = s.index("IMG"), len(s) - 1 - s[::-1].index("IMG")
  assert s[first - 1] == "Black" and s[first : first + N_IMG] == ["IMG"] * N_IMG
  assert s[second - N_IMG] == "Color" and s[second - N_IMG + 1 : second + 1] == ["IMG"] * N_IMG
  f = _strings(wl, front.input_ids)
  assert f[f.index("IMG") : f.index("IMG") + 2 * N_IMG] == ["IMG"] * (2 * N_IMG)  # both images first
  assert _targets(wl, inline) == _targets(wl, front)  # the answer is learned the same way
