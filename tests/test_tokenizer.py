"""The tokenizer wrapper: sentencepiece and tokenizer.json back ends, special tokens in text, loading."""

import json
import logging
import os
import pickle
import random

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llava_jax import tokenizer as tk

WORDS = (
    "the a an dog cat bird horse runs sits flies jumps on under over mat table chair red blue green yellow big "
    "small tall short what is are in this that yes no color of picture image photo man woman child holding "
    "wearing shirt hat street car bus train water sky tree grass white black brown two three many people "
    "standing sitting looking at next to near with and or there how where why describe detail"
).split()


def _sentences(n=2000, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + rng.choice(".?!") for _ in range(n)]


@pytest.fixture(scope="module")
def sp():
  return tk.train_sentencepiece(_sentences(), 200, user_defined_symbols=["\n", "<|im_end|>"])


def test_sentencepiece_basics(sp):
  assert (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id) == (0, 1, 2, 3)
  assert sp.vocab_size == 200
  assert set(sp.special_tokens) == {"<unk>", "<s>", "</s>", "<pad>"}
  ids = sp.encode("the dog runs.", add_bos=True)
  assert ids[0] == sp.bos_id and all(0 <= i < sp.vocab_size for i in ids)
  assert sp.id_to_token(ids[1]).startswith("▁")  # dummy prefix at the start of text
  assert sp.decode(ids) == "the dog runs."
  assert sp.token_to_id("</s>") == 2 and sp.token_to_id("<|im_end|>") is not None
  assert sp.token_to_id("no-such-piece") is None and sp.token_to_id("<unk>") == 0
  # Deterministic: training twice gives the same model.
  again = tk.train_sentencepiece(_sentences(), 200, user_defined_symbols=["\n", "<|im_end|>"])
  assert again.encode("a big red cat sits on the mat") == sp.encode("a big red cat sits on the mat")


def test_sentencepiece_special_tokens_in_text(sp):
  # Control pieces are matched in text (sentencepiece alone would spell "</s>" out in pieces) ...
  ids = sp.encode("a dog</s>the cat<s>")
  assert ids.count(sp.eos_id) == 1 and ids[-1] == sp.bos_id
  # ... and each stretch between them is a fresh start with its dummy prefix (documented choice).
  assert ids == sp.encode("a dog") + [sp.eos_id] + sp.encode("the cat") + [sp.bos_id]
  assert sp.id_to_token(sp.encode("</s>the")[1]) == "▁the"
  # User-defined pieces are sentencepiece's own business: no dummy prefix after them.
  assert [sp.id_to_token(i) for i in sp.encode("the<|im_end|>\nthe")] == ["▁the", "<|im_end|>", "\n", "t", "h", "e"]
  assert sp.decode(sp.encode("a dog</s>the cat"), skip_special_tokens=False) == "a dog</s>the cat"
  # The dummy prefix after </s> decodes as a space once the special token is skipped.
  assert sp.decode(sp.encode("a dog</s>the cat")) == "a dog the cat"


def test_sentencepiece_save_load_pickle(sp, tmp_path):
  sp.save(tmp_path / "tokenizer.model")
  for path in (tmp_path / "tokenizer.model", tmp_path):
    loaded = tk.load_tokenizer(path)
    assert isinstance(loaded, tk.SentencePieceTokenizer)
    assert loaded.encode("the red dog</s>") == sp.encode("the red dog</s>")
  clone = pickle.loads(pickle.dumps(sp))
  assert clone.encode("is this a cat?", add_bos=True) == sp.encode("is this a cat?", add_bos=True)
  with pytest.raises(ValueError, match="only apply to tokenizer.json"):
    tk.load_tokenizer(tmp_path / "tokenizer.model", eos_token="</s>")


def _word_level(specials=("<unk>", "<s>", "</s>", "<pad>")):
  vocab = {t: i for i, t in enumerate(list(specials) + WORDS + [".", "?", "!"])}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(list(specials))
  return tok


def test_hf_tokenizer_json_with_config(tmp_path):
  _word_level().save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": None, "unk_token": "<unk>"})
  )
  tok = tk.load_tokenizer(tmp_path)
  assert isinstance(tok, tk.HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
  assert tok.pad_id == 0  # pad_token null -> unk, as LLaVA pads Llama with unk
  ids = tok.encode("the dog runs.</s>", add_bos=True)
  assert [tok.id_to_token(i) for i in ids] == ["<s>", "the", "dog", "runs", ".", "</s>"]
  assert tok.decode(ids) == "the dog runs ."
  assert tok.decode(ids, skip_special_tokens=False) == "<s> the dog runs . </s>"
  assert set(tok.special_tokens) == {"<unk>", "<s>", "</s>", "<pad>"}
  assert tok.token_to_id("cat") == WORDS.index("cat") + 4 and tok.token_to_id("zebra") is None
  # explicit overrides win over tokenizer_config.json; None means "no such token"
  tok2 = tk.load_tokenizer(tmp_path / "tokenizer.json", bos_token=None, eos_token="<pad>")
  assert tok2.bos_id is None and tok2.eos_id == 3
  assert tok2.encode("the", add_bos=True) == [tok.token_to_id("the")]
  with pytest.raises(ValueError, match="eos token 'zebra'"):
    tk.load_tokenizer(tmp_path, eos_token="zebra")


def test_hf_byte_level_bpe_without_bos(tmp_path):
  """Qwen2-like: byte-level BPE, no BOS, <|endoftext|> / <|im_end|> specials."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300,
      show_progress=False,
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_sentences(), trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  t = tk.load_tokenizer(tmp_path / "tokenizer.json")
  assert t.bos_id is None and t.eos_id == tok.token_to_id("<|endoftext|>")
  assert t.pad_id == t.eos_id
  ids = t.encode("<|im_start|>user\nthe dog<|im_end|>\n", add_bos=True)  # add_bos is a no-op without BOS
  assert ids[0] == tok.token_to_id("<|im_start|>") and tok.token_to_id("<|im_end|>") in ids
  assert t.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nthe dog<|im_end|>\n"
  assert pickle.loads(pickle.dumps(t)).encode("the cat") == t.encode("the cat")


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tk.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- a real Llama-family model

MISTRAL = os.path.join(os.path.dirname(__file__), "data", "testdata", "mistral_v1_tokenizer.model")

# What transformers 4.36.2's slow LlamaTokenizer (the one LLaVA trains with) gives on Mistral's model.
# legacy=True: every stretch between special tokens gets the dummy prefix; legacy=False: only the text's start.
HF_436 = {
    (True, "A cat.</s>USER:"): ["▁A", "▁cat", ".", "</s>", "▁US", "ER", ":"],
    (False, "A cat.</s>USER:"): ["▁A", "▁cat", ".", "</s>", "USER", ":"],
    (True, "safe.  Your"): ["▁safe", ".", "▁", "▁Your"],
    (False, "safe.  Your"): ["▁safe", ".", "▁", "▁Your"],
    (True, " ASSISTANT:"): ["▁", "▁ASS", "IST", "ANT", ":"],
    (False, " ASSISTANT:"): ["▁", "▁ASS", "IST", "ANT", ":"],
    (True, "[/INST] A cat. </s><s>[INST] Color?"): [
        "▁[",
        "/",
        "INST",
        "]",
        "▁A",
        "▁cat",
        ".",
        "▁",
        "</s>",
        "<s>",
        "▁[",
        "INST",
        "]",
        "▁Color",
        "?",
    ],
    (False, "[/INST] A cat. </s><s>[INST] Color?"): [
        "▁[",
        "/",
        "INST",
        "]",
        "▁A",
        "▁cat",
        ".",
        "▁",
        "</s>",
        "<s>",
        "[",
        "INST",
        "]",
        "▁Color",
        "?",
    ],
    (True, "Hi </s> x"): ["▁Hi", "▁", "</s>", "▁", "▁x"],
    (False, "Hi </s> x"): ["▁Hi", "▁", "</s>", "▁x"],  # a space after </s> survives (the "<unk>" trick)
    (False, "</s>x"): ["</s>", "x"],  # no lone "▁" before a leading special token
}


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("mistral")
  with open(MISTRAL, "rb") as f, open(d / "tokenizer.model", "wb") as g:
    g.write(f.read())
  return d


@pytest.mark.parametrize("legacy,text", sorted(HF_436), ids=lambda x: repr(x))
def test_sentencepiece_legacy_matches_transformers_436(legacy, text):
  tok = tk.SentencePieceTokenizer.from_file(MISTRAL, legacy=legacy)
  assert [tok.id_to_token(i) for i in tok.encode(text)] == HF_436[legacy, text]


def test_legacy_true_matches_transformers_sentencepiece_backend():
  """Live check against the venv's transformers (its generic sentencepiece back end is HF's legacy=True)."""
  backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece").SentencePieceBackend
  ref = backend(vocab_file=MISTRAL, legacy=True, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
  ours = tk.SentencePieceTokenizer.from_file(MISTRAL, legacy=True)
  rng = random.Random(0)
  parts = ["</s>", "<s>", " ", "  ", "\n", "USER:", " ASSISTANT:", "A cat.", "[INST]", " [/INST]", "é", "日本", "x"]
  for _ in range(300):
    text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 8)))
    assert ours.encode(text) == ref.convert_tokens_to_ids(ref.tokenize(text)), repr(text)


def _write_config(d, **cfg):
  with open(d / "tokenizer_config.json", "w") as f:
    json.dump(cfg, f)


def test_load_reads_legacy_added_tokens_and_chat_template(mistral_dir, tmp_path, caplog):
  d = tmp_path / "ckpt"
  d.mkdir()
  (d / "tokenizer.model").write_bytes((mistral_dir / "tokenizer.model").read_bytes())
  _write_config(
      d,
      legacy=False,
      chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
      added_tokens_decoder={
          "32000": {
              "content": "<image>",
              "special": True,
              "lstrip": False,
              "rstrip": False,
              "normalized": False,
              "single_word": False,
          }
      },
  )
  with caplog.at_level(logging.INFO, logger="llava_jax.tokenizer"):
    tok = tk.load_tokenizer(d)
  assert "sentencepiece back end (the only tokenizer file), legacy=False" in caplog.text
  assert isinstance(tok, tk.SentencePieceTokenizer) and not tok.legacy and tok.backend == "sentencepiece"
  assert [tok.id_to_token(i) for i in tok.encode("A cat.</s>USER:")] == HF_436[False, "A cat.</s>USER:"]
  assert tok.vocab_size == 32001 and tok.token_to_id("<image>") == 32000 and "<image>" in tok.special_tokens
  assert tok.encode("a<image>b")[1] == 32000 and tok.decode([32000], skip_special_tokens=False) == "<image>"
  assert tok.chat_template.startswith("{{ bos_token }}")
  assert tk.load_tokenizer(d, legacy=True).legacy  # the argument wins over the file
  # chat_template.jinja wins over tokenizer_config.json's (as transformers reads them)
  (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  assert tk.load_tokenizer(d / "tokenizer.model").chat_template == "{{ messages[0]['content'] }}"
  clone = pickle.loads(pickle.dumps(tok))
  assert not clone.legacy and clone.vocab_size == 32001 and clone.encode("x</s>USER") == tok.encode("x</s>USER")


@pytest.fixture(scope="module")
def mistral_json(mistral_dir, tmp_path_factory):
  """tokenizer.json files converted from the model by the venv's transformers: Metaspace "always" / "first"."""
  transformers = pytest.importorskip("transformers")
  out = {}
  for legacy in (True, False):
    path = tmp_path_factory.mktemp("json") / "tokenizer.json"
    transformers.LlamaTokenizer.from_pretrained(str(mistral_dir), legacy=legacy).backend_tokenizer.save(str(path))
    out[legacy] = path.read_bytes()
  return out


def _both(tmp_path, mistral_dir, json_bytes, **cfg):
  d = tmp_path / "both"
  d.mkdir(exist_ok=True)
  (d / "tokenizer.model").write_bytes((mistral_dir / "tokenizer.model").read_bytes())
  (d / "tokenizer.json").write_bytes(json_bytes)
  _write_config(d, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **cfg)
  return d


def test_backend_choice_and_disagreement_warning(mistral_dir, mistral_json, tmp_path, caplog):
  # Both files, no legacy key: tokenizer.json (what AutoTokenizer loads); the back ends disagree on the
  # Llama-2 system prompt's double space, and the warning shows where.
  d = _both(tmp_path, mistral_dir, mistral_json[True])
  with caplog.at_level(logging.INFO, logger="llava_jax.tokenizer"):
    tok = tk.load_tokenizer(d, template="llama_2")
  assert isinstance(tok, tk.HFTokenizer) and "tokenizer.json back end (as AutoTokenizer loads it)" in caplog.text
  assert "disagree on the template 'llama_2' text" in caplog.text and "'▁▁'" in caplog.text, caplog.text
  # legacy=false, but a tokenizer.json that prefixes every stretch: the sentencepiece model does what the config says
  caplog.clear()
  d = _both(tmp_path, mistral_dir, mistral_json[True], legacy=False)
  with caplog.at_level(logging.INFO, logger="llava_jax.tokenizer"):
    tok = tk.load_tokenizer(d, template="vicuna_v1")
  assert isinstance(tok, tk.SentencePieceTokenizer) and not tok.legacy
  assert 'says "legacy": false, which its tokenizer.json does not implement' in caplog.text
  assert [tok.id_to_token(i) for i in tok.encode("A cat.</s>USER:")][-2:] == ["USER", ":"]
  # legacy=false with a "first" tokenizer.json: that file; it agrees with sentencepiece on vicuna_v1's text
  caplog.clear()
  d = _both(tmp_path, mistral_dir, mistral_json[False], legacy=False)
  with caplog.at_level(logging.INFO, logger="llava_jax.tokenizer"):
    tok = tk.load_tokenizer(d, template="vicuna_v1")
  assert isinstance(tok, tk.HFTokenizer) and "disagree" not in caplog.text, caplog.text
  assert [tok.id_to_token(i) for i in tok.encode("A cat.</s>USER:")][-2:] == ["USER", ":"]
  assert isinstance(tk.load_tokenizer(d, backend="sentencepiece"), tk.SentencePieceTokenizer)
  with pytest.raises(FileNotFoundError, match="backend='tokenizer.json'"):
    tk.load_tokenizer(mistral_dir, backend="tokenizer.json")
  with pytest.raises(ValueError, match="backend must be one of"):
    tk.load_tokenizer(d, backend="slow")


def test_compare_backends_names_the_first_difference():
  a = tk.SentencePieceTokenizer.from_file(MISTRAL, legacy=True)
  b = tk.SentencePieceTokenizer.from_file(MISTRAL, legacy=False)
  assert tk.compare_backends(a, a, ["x</s>USER"]) is None
  diff = tk.compare_backends(a, b, ["fine", "A cat.</s>USER: hi"])
  assert "'A cat.</s>USER: hi'" in diff and "'▁US'" in diff and "'USER'" in diff and "token 4" in diff


def test_a_zero_byte_model_says_so(tmp_path):
  empty = tmp_path / "tokenizer.model"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="is empty"):
    tk.load_tokenizer(str(empty))
