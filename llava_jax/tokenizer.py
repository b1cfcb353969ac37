"""Tokenizers: a sentencepiece `.model` or a Hugging Face `tokenizer.json`, behind one small interface.

    tok = load_tokenizer("path/to/dir_or_file")
    ids = tok.encode("USER: hi ASSISTANT:", add_bos=True)   # list[int]
    tok.decode(ids)                                          # str

Special tokens in text. Rendered conversations contain the separators as
text ("</s>", "<|im_end|>", "<start_of_turn>"), so `encode` must map those
strings to their ids, as HF tokenizers do:
- `tokenizer.json` (`tokenizers` library): its own added-token matching.
- sentencepiece: sentencepiece never parses control pieces (`<s>`, `</s>`,
  `<unk>`, `<pad>`) out of text, so `encode` splits the text on them first and
  encodes each stretch in between separately (user-defined pieces, e.g.
  `<|im_start|>` in a tiny test model, are matched by sentencepiece itself).

The leading-space question. A sentencepiece model with `add_dummy_prefix`
(Llama, Mistral; not Gemma) encodes "hi" as "▁hi" at the start of every
`encode` call. LLaVA tokenizes pieces of a conversation separately and then
patches the counts (`instruction_len - 2`, and `-1` per round for non-legacy
Llama tokenizers) to undo that. We do not: `llava_jax.data.tokenize` only
ever tokenizes *prefixes of the whole rendered text*, so there is no
per-piece prefix to subtract, and any disagreement surfaces as a
`template_mismatch` rejection instead of a silently shifted mask. What remains
is a choice of where a "start of text" is; for sentencepiece we take every
stretch between special tokens as a start (the dummy prefix applies after
`<s>`/`</s>`). That is plain sentencepiece behaviour, the tokenization Meta's
Llama-2 and Mistral reference code produce (each round is a separate
`sp.encode`), and HF's `legacy=True`. For `tokenizer.json` the file decides
(Metaspace `prepend_scheme`, a `Prepend` normalizer, or byte-level with no
prefix at all); we do not override it. `llava_jax.data.tokenize` also starts a
new stretch after each `<image>` placeholder, as LLaVA's `tokenizer_image_token`
does.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm


class Tokenizer:
  """Interface shared by the sentencepiece and `tokenizer.json` back ends.

  Attributes:
    bos_id, eos_id: ids of the begin/end-of-sequence tokens, None if the
      tokenizer has none (e.g. Qwen2 has no BOS).
    pad_id: id used for padding; never None (falls back to unk, as LLaVA does
      for Llama, then to eos).
    vocab_size: number of ids `encode` can return (including added tokens).
    special_tokens: strings that `encode` maps to a single id wherever they
      occur in text.
  """

  bos_id: int | None
  eos_id: int | None
  pad_id: int
  unk_id: int | None
  vocab_size: int
  special_tokens: tuple[str, ...]

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Text -> ids (`list[int]`, each in [0, vocab_size)); BOS prepended iff `add_bos` and the tokenizer has one."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Ids (any int sequence or int[T] array) -> text."""
    raise NotImplementedError

  def token_to_id(self, token: str) -> int | None:
    """Id of one vocabulary entry (piece/token string), None if it is not in the vocabulary."""
    raise NotImplementedError

  def id_to_token(self, token_id: int) -> str:
    """Vocabulary entry (piece/token string) of one id."""
    raise NotImplementedError


def _split_pattern(tokens: Iterable[str]) -> re.Pattern | None:
  """A regex whose `split` keeps `tokens` as separate items (longest first, so `<|im_start|>` beats `<`)."""
  tokens = sorted(set(t for t in tokens if t), key=len, reverse=True)
  return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (serialized `ModelProto` bytes, e.g. a Llama `tokenizer.model`).

  Pickles as its model bytes, so it can be shipped to data-loader workers.
  """

  def __init__(self, model_proto: bytes, *, name: str = "<sentencepiece>"):
    self.name = name
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    sp = self._sp
    self.vocab_size = sp.get_piece_size()
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
    self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
    pad = sp.pad_id()
    if pad < 0:
      pad = self.unk_id if self.unk_id is not None else self.eos_id
    if pad is None:
      raise ValueError(f"sentencepiece model {name} has no pad, unk or eos piece to pad with")
    self.pad_id = pad
    # Pieces sentencepiece will not match in text; we match them ourselves.
    self._special_ids = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if sp.is_control(i) or sp.is_unknown(i)}
    self.special_tokens = tuple(self._special_ids)
    self._split = _split_pattern(self._special_ids)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
    with open(path, "rb") as f:
      return cls(f.read(), name=os.fspath(path))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the `.model` file (loadable by `load_tokenizer` and by sentencepiece itself)."""
    with open(path, "wb") as f:
      f.write(self._proto)

  def __getstate__(self):
    return {"model_proto": self._proto, "name": self.name}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], name=state["name"])

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [self.bos_id] if add_bos and self.bos_id is not None else []
    chunks = self._split.split(text) if self._split is not None else [text]
    for chunk in chunks:
      if not chunk:
        continue
      special = self._special_ids.get(chunk)
      if special is not None:
        ids.append(special)
      else:
        ids.extend(self._sp.encode(chunk))
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    special = set(self._special_ids.values())
    if skip_special_tokens:
      return self._sp.decode([i for i in ids if i not in special])
    out, run = [], []
    for i in ids:
      if i in special:
        out.append(self._sp.decode(run))
        out.append(self._sp.id_to_piece(i))
        run = []
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    if i == self.unk_id and token != self._sp.id_to_piece(i):
      return None
    return i

  def id_to_token(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))


# Names tried, in order, when neither the caller nor tokenizer_config.json says.
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>")
_EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
_UNK_NAMES = ("<unk>", "<|unk|>")


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (the contents of an HF `tokenizer.json`).

  `tokenizer.json` does not say which token is BOS/EOS/pad; they come from
  the arguments, else from `tokenizer_config.json` (see `load_tokenizer`),
  else from the usual names (`<s>`, `<bos>`, `<|begin_of_text|>`; `</s>`,
  `<eos>`, `<|endoftext|>`, ...). A name given explicitly as None means "none".
  """

  _UNSET = object()

  def __init__(self, tokenizer, *, bos_token=_UNSET, eos_token=_UNSET, pad_token=_UNSET,
               unk_token=_UNSET, name: str = "<tokenizer.json>"):
    self.name = name
    self._tok = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    self.special_tokens = tuple(t.content for t in added.values() if t.special)

    def resolve(given, names, what):
      if given is None:
        return None
      if given is not HFTokenizer._UNSET:
        i = tokenizer.token_to_id(given)
        if i is None:
          raise ValueError(f"{what} token {given!r} of {name} is not in its vocabulary")
        return i
      for n in names:
        i = tokenizer.token_to_id(n)
        if i is not None:
          return i
      return None

    self.bos_id = resolve(bos_token, _BOS_NAMES, "bos")
    self.eos_id = resolve(eos_token, _EOS_NAMES, "eos")
    self.unk_id = resolve(unk_token, _UNK_NAMES, "unk")
    pad = resolve(pad_token, _PAD_NAMES, "pad")
    pad = pad if pad is not None else (self.unk_id if self.unk_id is not None else self.eos_id)
    if pad is None:
      raise ValueError(f"{name}: no pad, unk or eos token to pad with; pass pad_token=")
    self.pad_id = pad

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if add_bos and self.bos_id is not None else []) + list(ids)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))


def _token_content(value) -> str | None:
  """tokenizer_config.json stores a token as a string or as {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_special_names(directory: str) -> dict:
  """BOS/EOS/pad/unk names from tokenizer_config.json, then special_tokens_map.json; keys absent if unknown."""
  names = {}
  for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
    p = os.path.join(directory, fname)
    if not os.path.exists(p):
      continue
    with open(p) as f:
      cfg = json.load(f)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
      if key in cfg:
        names[key] = _token_content(cfg[key])
  return names


def load_tokenizer(path: str | os.PathLike, **special_tokens) -> Tokenizer:
  """Opens a tokenizer from a file or a directory.

  Args:
    path: a sentencepiece `*.model`, a `tokenizer.json`, or a directory
      holding one (`tokenizer.json` is preferred: it includes HF added tokens
      that a `tokenizer.model` lacks).
    **special_tokens: for `tokenizer.json` only, `bos_token=`, `eos_token=`,
      `pad_token=`, `unk_token=` override `tokenizer_config.json`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for fname in ("tokenizer.json", "tokenizer.model"):
      if os.path.exists(os.path.join(path, fname)):
        return load_tokenizer(os.path.join(path, fname), **special_tokens)
    models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
    if len(models) == 1:
      return load_tokenizer(os.path.join(path, models[0]), **special_tokens)
    raise FileNotFoundError(f"no tokenizer.json or single *.model in {path}: found {sorted(os.listdir(path))}")
  if path.endswith(".json"):
    import tokenizers  # local: only the tokenizer.json path needs it
    names = {**_read_special_names(os.path.dirname(path) or "."), **special_tokens}
    return HFTokenizer(tokenizers.Tokenizer.from_file(path), name=path, **names)
  if special_tokens:
    raise ValueError(f"special-token overrides {sorted(special_tokens)} only apply to tokenizer.json, not {path}")
  return SentencePieceTokenizer.from_file(path)


def train_sentencepiece(sentences: Sequence[str], vocab_size: int, *, user_defined_symbols: Sequence[str] = (),
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Trains a small Llama-style sentencepiece model in memory (for tests and the embedded demo).

  Llama-like settings: BPE, identity normalization, whitespace kept as is,
  dummy prefix on, digits split; ids 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3 `<pad>`.
  Deterministic (one thread, no sampling/shuffling). If the text supports fewer
  pieces than `vocab_size`, the vocabulary is smaller (check `.vocab_size`).

  Args:
    sentences: training text; "\\n" inside a sentence is fine if "\\n" is in
      `user_defined_symbols`.
    vocab_size: target number of pieces.
    user_defined_symbols: strings always kept as one piece (e.g. "<|im_start|>", "\\n").
  """
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(sentences)), model_writer=buf, vocab_size=vocab_size,
      model_type=model_type, character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
      user_defined_symbols=list(user_defined_symbols), unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      num_threads=1, shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2,
      max_sentence_length=1 << 16)
  return SentencePieceTokenizer(buf.getvalue(), name="<trained sentencepiece>")
