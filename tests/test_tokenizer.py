"""The tokenizer wrapper: sentencepiece and tokenizer.json back ends, special tokens in text, loading."""
import json
import pickle
import random

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llava_jax import tokenizer as tk

WORDS = ("the a an dog cat bird horse runs sits flies jumps on under over mat table chair red blue green yellow big "
         "small tall short what is are in this that yes no color of picture image photo man woman child holding "
         "wearing shirt hat street car bus train water sky tree grass white black brown two three many people "
         "standing sitting looking at next to near with and or there how where why describe detail").split()


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
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": None, "unk_token": "<unk>"}))
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
  trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
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
