"""template="hf": real chat templates (testdata/chat_templates) give transformers' ids and assistant masks."""

import os
import pickle
import random

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llava_jax import tokenizer as tk
from llava_jax.data import chat_template as ct
from llava_jax.data import templates as tp
from llava_jax.data.tokenize import IGNORE, Rejected, RejectReason, TokenizedSample, tokenize_conversation

transformers = pytest.importorskip("transformers")

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")
IMG = 9999
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<image>",
    "<s>",
    "</s>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
]
WORDS = "the a dog cat runs sits on mat red blue what is this color of picture black white man yes no".split()
# template -> (bos, eos) of the model family it comes from
FAMILY = {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "qwen2_5": (None, "<|im_end|>"), "gemma": ("<bos>", "<eos>")}


def _source(name):
  with open(os.path.join(TESTDATA, "chat_templates", name + ".jinja")) as f:
    return f.read()


@pytest.fixture(scope="module")
def bpe():
  """Byte-level BPE (as Llama-3, Qwen2) with every family's special tokens and <image> (as HF processors add it)."""
  rng = random.Random(0)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  sents = [
      " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + rng.choice([".", "?", "\n"]) for _ in range(800)
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
  return tok


def _pair(tok, template, bos, eos):
  """(transformers' fast tokenizer, ours) on the same tokenizers.Tokenizer with the chat template."""
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>"
  )
  hf.chat_template = _source(template)
  ours = tk.HFTokenizer(tok, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>", chat_template=hf.chat_template)
  return hf, ours


def _conversations(seed, n=20, system=True):
  rng = random.Random(seed)
  words = ["cat", "dog", "What", "is", "it?", "Yes.", "no", "red\nblue", "big"]
  for trial in range(n):
    conv = [{"from": "system", "value": "Be brief."}] if system and trial % 2 else []
    for _ in range(rng.randint(1, 3)):
      conv.append({"from": "human", "value": " ".join(rng.choices(words, k=rng.randint(1, 4)))})
      conv.append({"from": "gpt", "value": " ".join(rng.choices(words, k=rng.randint(1, 4)))})
    image = trial % 3 != 0
    if image:
      conv[-2 if len(conv) % 2 else 0] = {"from": "human", "value": "<image>\n" + conv[-2]["value"]}
    yield {"id": f"c{trial}", "conversations": conv, **({"image": "x.jpg"} if image else {})}


def _ours(sample, ours, add_bos=False):
  r = tokenize_conversation(sample, ours, "hf", image_token_id=IMG, num_image_tokens=1, max_len=4096, add_bos=add_bos)
  assert isinstance(r, TokenizedSample), r
  image_id = ours.token_to_id("<image>")
  return [image_id if i == IMG else int(i) for i in r.input_ids], [int(l != IGNORE) for l in r.labels]


def _transformers(hf, messages):
  out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_generation_blocks_give_transformers_assistant_masks(bpe, family):
  hf, ours = _pair(bpe, family + "_training", *FAMILY[family])
  template = tp.get_template("hf", ours)
  assert template.has_generation and template.content_format == "string"
  for sample in _conversations(1, system=family != "gemma"):
    ids, mask = _ours(sample, ours)
    assert (ids, mask) == _transformers(hf, template.messages(sample["conversations"])), sample
    assert sum(mask) > 0


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_prefix_masks_of_the_original_templates(bpe, family):
  """Without {% generation %}: answer + end-of-turn text. Equal to the TRL training variant's generation masks,
  except Qwen2.5's, whose block also takes the '\\n' after 'assistant' (a prompt token: the generation prompt
  ends with it)."""
  hf, ours = _pair(bpe, family + "_training", *FAMILY[family])
  _, original = _pair(bpe, family, *FAMILY[family])
  assert not tp.get_template("hf", original).has_generation
  newline = bpe.token_to_id("Ċ")  # "\n" in a byte-level vocabulary
  for sample in _conversations(2, system=family != "gemma"):
    ids, mask = _ours(sample, original)
    ref_ids, ref_mask = _transformers(hf, tp.get_template("hf", original).messages(sample["conversations"]))
    assert ids == ref_ids
    if family == "qwen2_5":
      diff = [i for i, (a, b) in enumerate(zip(mask, ref_mask)) if a != b]
      assert diff and all(
          ids[i] == newline
          and ref_mask[i]
          and original.decode(ids[:i], skip_special_tokens=False).endswith("<|im_start|>assistant")
          for i in diff
      ), (diff, sample)
    else:
      assert mask == ref_mask, sample
  text = "".join(s.text for s in tp.render(sample["conversations"], "hf", original) if s.is_target)
  assert text.endswith({"llama3": "<|eot_id|>", "qwen2_5": "<|im_end|>\n", "gemma": "<end_of_turn>\n"}[family])


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  """transformers' fast tokenizer converted from Mistral's sentencepiece model (legacy and not), <image> added."""
  d = tmp_path_factory.mktemp("mistral")
  with open(os.path.join(TESTDATA, "mistral_v1_tokenizer.model"), "rb") as f:
    (d / "tokenizer.model").write_bytes(f.read())
  out = {}
  for legacy in (True, False):
    hf = transformers.LlamaTokenizer.from_pretrained(str(d), legacy=legacy)
    hf.add_tokens(["<image>"], special_tokens=True)
    out[legacy] = hf
  return out


@pytest.mark.parametrize("legacy", [True, False])
def test_llava_next_mistral_template_on_mistral_tokenizer(mistral, legacy):
  """llava-hf/llava-v1.6-mistral-7b-hf's template (content as parts): generation masks equal transformers';
  the original template's prefix masks equal them too (the ' ' after '</s>' goes with the next '[INST]'), but
  for the ' ' that ends the conversation, which they learn (a token after the stop token: never generated)."""
  hf = mistral[legacy]
  training, original = _source("llava_next_mistral_training"), _source("llava_next_mistral")
  ours = tk.HFTokenizer(hf.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  for sample in _conversations(3):
    results = []
    for source in (training, original):
      ours.chat_template = hf.chat_template = source
      template = tp.get_template("hf", ours)
      assert template.content_format == "parts"
      # the template writes no BOS; llava-hf's processor adds it when it tokenizes the prompt
      ids, mask = _ours(sample, ours)
      assert ids == _transformers(hf, template.messages(sample["conversations"]))[0]
      results.append((ids, mask))
    ours.chat_template = hf.chat_template = training
    ref = _transformers(hf, tp.get_template("hf", ours).messages(sample["conversations"]))
    assert results[0] == ref, sample
    (ids, mask), (_, prefix_mask) = results
    assert prefix_mask[:-1] == mask[:-1] and hf.convert_ids_to_tokens(ids[-2:]) == ["</s>", "▁"], sample
    assert (mask[-1], prefix_mask[-1]) == (0, 1)
    with_bos = tokenize_conversation(sample, ours, "hf", image_token_id=IMG, num_image_tokens=1, max_len=4096)
    assert with_bos.input_ids[0] == ours.bos_id and len(with_bos.input_ids) == len(ids) + 1


def test_mistral_v3_template_is_not_prefix_stable_with_a_system_text(mistral):
  hf = mistral[False]
  ours = tk.HFTokenizer(
      hf.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=_source("mistral_v3")
  )
  conv = [
      {"from": "human", "value": "Hi"},
      {"from": "gpt", "value": "Hello."},
      {"from": "human", "value": "Color?"},
      {"from": "gpt", "value": "Black."},
  ]
  segs = tp.render(conv, "hf", ours)
  assert [s.text for s in segs if s.is_target] == [" Hello.</s>", " Black.</s>"]
  assert "".join(s.text for s in segs) == "<s>[INST] Hi[/INST] Hello.</s>[INST] Color?[/INST] Black.</s>"
  # its system text goes into the *last* user turn, so the conversation's prefixes render differently
  r = tokenize_conversation(
      {"id": "m3", "conversations": [{"from": "system", "value": "Be brief."}] + conv},
      ours,
      "hf",
      image_token_id=IMG,
      num_image_tokens=1,
      max_len=99,
  )
  assert isinstance(r, Rejected) and r.reason == RejectReason.TEMPLATE_MISMATCH
  assert "not prefix-stable at message 2" in r.detail and "{% generation %}" in r.detail


@pytest.mark.parametrize(
    "name,fmt,stop",
    [
        ("llama3", "string", "<|eot_id|>"),
        ("qwen2_5", "string", "<|im_end|>"),
        ("gemma", "string", "<end_of_turn>"),
        ("mistral_v3", "string", "</s>"),
        ("llava_next_mistral", "parts", "</s>"),
        ("qwen2_vl", "parts", "<|im_end|>"),
    ],
)
def test_content_format_stop_and_generation_prompt(bpe, name, fmt, stop):
  bos, eos = FAMILY.get(name, ("<s>", "</s>") if "mistral" in name else (None, "<|im_end|>"))
  hf, ours = _pair(bpe, name, bos, eos)
  template = tp.get_template("hf", ours)
  assert (template.content_format, template.stop) == (fmt, stop)
  conv = [
      {"from": "human", "value": "What is this?\n<image>"},
      {"from": "gpt", "value": "A cat."},
      {"from": "human", "value": "Color?"},
  ]
  messages = template.messages(conv)
  assert tp.prompt_for_generation(conv, "hf", ours) == hf.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True
  )
  if name == "qwen2_vl":  # images as parts: Qwen2-VL's own vision placeholders
    assert "<|vision_start|><|image_pad|><|vision_end|>What is this?" in tp.prompt_for_generation(conv, "hf", ours)


def test_errors_sandbox_and_pickling(bpe, tmp_path):
  hf, ours = _pair(bpe, "gemma", *FAMILY["gemma"])
  r = tokenize_conversation(
      {
          "id": "g",
          "conversations": [
              {"from": "system", "value": "x"},
              {"from": "human", "value": "hi"},
              {"from": "gpt", "value": "yo"},
          ],
      },
      ours,
      "hf",
      image_token_id=IMG,
      num_image_tokens=1,
      max_len=99,
  )
  assert r.reason == RejectReason.TEMPLATE_MISMATCH and "System role not supported" in r.detail
  evil = tk.HFTokenizer(bpe, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
  with pytest.raises(tp.ConversationError, match="chat template"):
    tp.render([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "hf", evil)
  with pytest.raises(ValueError, match="has none"):
    tp.get_template("hf", tk.HFTokenizer(bpe))
  with pytest.raises(ValueError, match="does not compile"):
    ct.ChatTemplate("{% for %}")
  template = tp.get_template("hf", ours)
  clone = pickle.loads(pickle.dumps(template))
  conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
  assert clone.render(conv) == template.render(conv) and clone.special_tokens == template.special_tokens
  # a checkpoint directory: load_tokenizer reads chat_template.jinja, tokenize_conversation renders it
  bpe.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "chat_template.jinja").write_text(_source("llama3"))
  (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}')
  loaded = tk.load_tokenizer(tmp_path)
  r = tokenize_conversation(
      {"id": "d", "conversations": conv}, loaded, "hf", image_token_id=IMG, num_image_tokens=1, max_len=99
  )
  assert r.input_ids[0] == loaded.bos_id and list(r.input_ids).count(loaded.bos_id) == 1  # the template's BOS
  assert (
      loaded.decode([i for i, l in zip(r.input_ids, r.labels) if l != IGNORE], skip_special_tokens=False)
      == "yo<|eot_id|>"
  )
