"""Tokenizers: a sentencepiece `.model` or a Hugging Face `tokenizer.json`, behind one small interface.

    tok = load_tokenizer("path/to/checkpoint_dir")           # picks the back end, logs which
    ids = tok.encode("USER: hi ASSISTANT:", add_bos=True)   # list[int]
    tok.decode(ids)                                          # str

Special tokens in text. Rendered conversations contain the separators as
text ("</s>", "<|im_end|>", "<start_of_turn>"), so `encode` maps those
strings to their ids, as HF tokenizers do:
- `tokenizer.json` (`tokenizers` library): its own added-token matching.
- sentencepiece: sentencepiece never parses control pieces (`<s>`, `</s>`,
  `<unk>`) out of text, so `encode` splits the text on them (and on the added
  tokens of `tokenizer_config.json`, e.g. llava-hf's `<image>`) and encodes
  each stretch in between, as HF's slow `LlamaTokenizer` does.

Where the dummy prefix goes (`legacy`). A sentencepiece model with
`add_dummy_prefix` (Llama, Mistral; not Gemma) writes "hi" as "▁hi" at the
start of text. HF's slow tokenizer has two behaviours, chosen by `"legacy"`
in the checkpoint's `tokenizer_config.json` (absent means True):
- legacy=True: every stretch between special tokens starts with the prefix:
  "A cat.</s>USER:" -> ['▁A', '▁cat', '.', '</s>', '▁US', 'ER', ':'];
- legacy=False: only the start of the text has it:
  "A cat.</s>USER:" -> [..., '</s>', 'USER', ':'] (lmsys/vicuna-7b-v1.5 and
  the LLaVA-1.5 checkpoints trained from it set `"legacy": false`; LLaVA
  trained them with this slow tokenizer, `use_fast=False`, transformers 4.36).
`SentencePieceTokenizer` does exactly what that tokenizer does in each mode
(checked token for token against transformers 4.36.2 on Mistral's model, see
tests/test_tokenizer.py). A `tokenizer.json` encodes as the file says (its
Metaspace `prepend_scheme` or `Prepend` normalizer); we do not override it.
`llava_jax.data.tokenize` encodes each stretch between `<image>` tags with a
separate `encode` call, as LLaVA's `tokenizer_image_token` does.

Which back end (`load_tokenizer(dir)`, logged at INFO). A checkpoint that
ships one of `tokenizer.json` / `tokenizer.model` gets that one. One that
ships both gets `tokenizer.json` (what `AutoTokenizer` loads), unless
`tokenizer_config.json` says `"legacy": false` and the `tokenizer.json`
prefixes every stretch anyway (the legacy behaviour, as Llama-2's and
Mistral's converted files do): then the sentencepiece model, the only one of
the two that does what the config asks. With both present the two are
compared on the conversation template's own text and a warning names the
first difference (they differ e.g. on runs of spaces, "safe.  Your" in
Llama-2's system prompt): training and serving one checkpoint through
different back ends would give different ids. `backend=` overrides.

What lives where. This module: the two back ends (`SentencePieceTokenizer`,
`HFTokenizer`), opening them, comparing them (`compare_backends`) and
`load_tokenizer`. `llava_jax.tokenizer_files`: finding a checkpoint's
tokenizer files, reading `tokenizer_config.json` and its siblings
(`read_tokenizer_config`) and choosing the back end by the rule above
(`choose_backend`); `SPIECE_UNDERLINE`, `BACKENDS` and `read_tokenizer_config`
are importable from here too.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import sentencepiece as spm

from llava_jax import storage
from llava_jax.tokenizer_files import BACKENDS, SPIECE_UNDERLINE, choose_backend, file_backend, find_files
from llava_jax.tokenizer_files import read_tokenizer_config

log = logging.getLogger(__name__)


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
    backend: "sentencepiece" or "tokenizer.json".
    chat_template: the checkpoint's Jinja chat template (from
      `tokenizer_config.json` or `chat_template.jinja`), None if it has none.
  """

  bos_id: int | None
  eos_id: int | None
  pad_id: int
  unk_id: int | None
  vocab_size: int
  special_tokens: tuple[str, ...]
  backend: str = ""
  chat_template: str | None = None

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

  def special_token_strings(self) -> dict[str, str | None]:
    """{"bos_token", "eos_token", "pad_token", "unk_token"} as strings (None if absent), for chat templates."""
    name = lambda i: None if i is None else self.id_to_token(i)
    return {
        "bos_token": name(self.bos_id),
        "eos_token": name(self.eos_id),
        "pad_token": name(self.pad_id),
        "unk_token": name(self.unk_id),
    }


def _split_pattern(tokens: Iterable[str]) -> re.Pattern | None:
  """A regex whose `split` keeps `tokens` as separate items (longest first, so `<|im_start|>` beats `<`)."""
  tokens = sorted(set(t for t in tokens if t), key=len, reverse=True)
  return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (serialized `ModelProto` bytes, e.g. a Llama `tokenizer.model`), as HF's slow tokenizer.

  Args:
    model_proto: the model file's bytes.
    name: for messages.
    legacy: HF's `legacy` (see the module docstring); only matters for a
      model with `add_dummy_prefix`.
    added_tokens: HF added tokens, `{"id": int, "content": str, "special":
      bool, "lstrip": bool, "rstrip": bool}` (`tokenizer_config.json`'s
      `added_tokens_decoder`); ids past the model's pieces extend the
      vocabulary, ids inside it mark existing pieces as never split.
    chat_template: kept for `template="hf"`.

  Pickles as its arguments, so it can be shipped to data-loader workers.
  """

  backend = "sentencepiece"

  def __init__(
      self,
      model_proto: bytes,
      *,
      name: str = "<sentencepiece>",
      legacy: bool = True,
      added_tokens: Sequence[Mapping[str, Any]] = (),
      chat_template: str | None = None,
  ):
    self.name = name
    self._proto = bytes(model_proto)
    if not self._proto:
      raise ValueError(
          f"sentencepiece model {name} is empty (0 bytes): a failed copy or "
          "download? Point data.tokenizer at the checkpoint's tokenizer.model"
      )
    self.legacy = bool(legacy)
    self._added = [dict(t) for t in added_tokens]
    self.chat_template = chat_template
    proto = None
    if not self.legacy:  # local: only legacy=False edits the model (needs protobuf)
      from sentencepiece import sentencepiece_model_pb2

      proto = sentencepiece_model_pb2.ModelProto.FromString(self._proto)
    # legacy=False: the prefix once at the start of the text (HF drops sentencepiece's own, adds "▁" itself).
    self._prefix_once = proto is not None and proto.normalizer_spec.add_dummy_prefix
    if self._prefix_once:
      proto.normalizer_spec.add_dummy_prefix = False
      self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    else:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    sp = self._sp
    n = sp.get_piece_size()
    self._extra = {}  # id >= n -> content (added tokens outside the model)
    self._split_ids = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    special = set(self._split_ids)
    self._strip = {}  # content -> (lstrip, rstrip)
    for t in self._added:
      i, content = int(t["id"]), t["content"]
      if i >= n:
        self._extra[i] = content
      elif sp.id_to_piece(i) != content:
        raise ValueError(
            f"{name}: added token {content!r} has id {i}, which is the model's piece {sp.id_to_piece(i)!r}"
        )
      self._split_ids[content] = i
      if t.get("special", True):
        special.add(content)
      if t.get("lstrip") or t.get("rstrip"):
        self._strip[content] = (bool(t.get("lstrip")), bool(t.get("rstrip")))
    if self._extra and sorted(self._extra) != list(range(n, n + len(self._extra))):
      raise ValueError(f"{name}: added token ids {sorted(self._extra)} do not continue the model's {n} pieces")
    self.vocab_size = n + len(self._extra)
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
    self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
    pad = sp.pad_id()
    if pad < 0:
      pad = self.unk_id if self.unk_id is not None else self.eos_id
    if pad is None:
      raise ValueError(f"sentencepiece model {name} has no pad, unk or eos piece to pad with")
    self.pad_id = pad
    self.special_tokens = tuple(sorted(special, key=self._split_ids.get))
    self._special_ids = {self._split_ids[t] for t in special}
    self._split_id_set = set(self._split_ids.values())
    self._split = _split_pattern(self._split_ids)
    unk = sp.id_to_piece(self.unk_id) if self.unk_id is not None else "<unk>"
    self._unk_text, self._unk_len = unk, len(sp.encode(unk))

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> "SentencePieceTokenizer":
    return cls(storage.read_bytes(path), name=os.fspath(path), **kwargs)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the `.model` file (loadable by `load_tokenizer` and by sentencepiece itself)."""
    storage.write_atomic(path, self._proto)

  def __getstate__(self):
    return {
        "model_proto": self._proto,
        "name": self.name,
        "legacy": self.legacy,
        "added_tokens": self._added,
        "chat_template": self.chat_template,
    }

  def __setstate__(self, state):
    state = dict(state)
    self.__init__(state.pop("model_proto"), **state)

  def _encode_stretch(self, text: str) -> list[int]:
    """HF `LlamaTokenizer._tokenize`: without the model's prefix a leading space must survive, hence "<unk>" + text."""
    if self._prefix_once and text.startswith((SPIECE_UNDERLINE, " ")):
      return self._sp.encode(self._unk_text + text)[self._unk_len :]
    return self._sp.encode(text)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [self.bos_id] if add_bos and self.bos_id is not None else []
    if not text:
      return ids
    if self._prefix_once:  # HF LlamaTokenizer.tokenize with legacy=False
      text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
    chunks = self._split.split(text) if self._split is not None else [text]
    for k, chunk in enumerate(chunks):  # HF's lstrip/rstrip of added tokens eat the neighbours' spaces
      strip = self._strip.get(chunk) if k % 2 else None
      if strip and strip[0] and k > 0:
        chunks[k - 1] = chunks[k - 1].rstrip()
      if strip and strip[1] and k + 1 < len(chunks):
        chunks[k + 1] = chunks[k + 1].lstrip()
    out = []
    for k, chunk in enumerate(chunks):
      if not chunk:
        continue
      if k % 2:  # re.split puts the matched tokens at odd positions
        out.append(self._split_ids[chunk])
      else:
        out.extend(self._encode_stretch(chunk))
    if (
        self._prefix_once
        and len(out) > 1
        and self._sp.id_to_piece(out[0]) == SPIECE_UNDERLINE
        and out[1] in self._special_ids
    ):
      out = out[1:]  # "▁" + a text that starts with a special token
    return ids + out

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Pieces between split tokens are decoded together (sentencepiece drops a leading "▁" of each run)."""
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special_ids]
    out, run = [], []
    for i in ids:
      if i in self._split_id_set:
        out.append(self._sp.decode(run))
        out.append(self.id_to_token(i))
        run = []
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)

  def token_to_id(self, token: str) -> int | None:
    if token in self._split_ids:
      return self._split_ids[token]
    i = self._sp.piece_to_id(token)
    if i == self.unk_id and token != self._sp.id_to_piece(i):
      return None
    return i

  def id_to_token(self, token_id: int) -> str:
    token_id = int(token_id)
    if token_id in self._extra:
      return self._extra[token_id]
    return self._sp.id_to_piece(token_id)


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
  backend = "tokenizer.json"

  def __init__(
      self,
      tokenizer,
      *,
      bos_token=_UNSET,
      eos_token=_UNSET,
      pad_token=_UNSET,
      unk_token=_UNSET,
      name: str = "<tokenizer.json>",
      chat_template: str | None = None,
  ):
    self.name = name
    self._tok = tokenizer
    self.chat_template = chat_template
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


# ----------------------------------------------------------------------------- opening


def _open(backend: str, path: str, cfg: Mapping, legacy: bool | None, special_tokens: Mapping) -> Tokenizer:
  template = cfg.get("chat_template")
  if backend == "tokenizer.json":
    import tokenizers  # local: only the tokenizer.json path needs it

    names = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in cfg}
    return HFTokenizer(
        tokenizers.Tokenizer.from_str(storage.read_text(path)),
        name=path,
        chat_template=template,
        **{**names, **special_tokens},
    )
  if special_tokens:
    raise ValueError(f"special-token overrides {sorted(special_tokens)} only apply to tokenizer.json, not {path}")
  legacy = cfg.get("legacy", True) if legacy is None else legacy
  return SentencePieceTokenizer.from_file(
      path, legacy=legacy, added_tokens=cfg.get("added_tokens", ()), chat_template=template
  )


def compare_backends(a: Tokenizer, b: Tokenizer, texts: Iterable[str]) -> str | None:
  """None if `a` and `b` encode every text (split at `<image>` tags, as training does) to the same ids;
  else a description of the first difference."""
  for text in texts:
    for part in text.split("<image>"):
      x, y = a.encode(part), b.encode(part)
      if x == y:
        continue
      k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
      show = lambda tok, ids: [tok.id_to_token(i) for i in ids[max(0, k - 2) : k + 3]]
      cut = part[:160] + ("..." if len(part) > 160 else "")
      return f"on {cut!r}: {a.backend} gives ...{show(a, x)}, {b.backend} ...{show(b, y)} (token {k})"
  return None


def load_tokenizer(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    legacy: bool | None = None,
    template: str | None = None,
    **special_tokens,
) -> Tokenizer:
  """Opens a tokenizer from a file or a checkpoint directory (see the module docstring).

  Args:
    path: a sentencepiece `*.model`, a `tokenizer.json`, or a directory
      holding one or both (with `tokenizer_config.json` etc. beside them;
      a file's directory is read too).
    backend: "auto" (module docstring), "sentencepiece" or "tokenizer.json".
    legacy: overrides `tokenizer_config.json`'s `legacy` (sentencepiece only).
    template: the conversation template the tokenizer will be used with; when
      a directory ships both back ends they are compared on its text (None:
      every built-in template's).
    **special_tokens: for `tokenizer.json` only, `bos_token=`, `eos_token=`,
      `pad_token=`, `unk_token=` override `tokenizer_config.json`.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  path = storage.check(path, "tokenizer")
  if not storage.isdir(path):
    cfg = read_tokenizer_config(os.path.dirname(path) or ".")
    kind = file_backend(path, backend)
    tok = _open(kind, path, cfg, legacy, special_tokens)
    log.info("tokenizer %s: %s back end%s", path, kind, _legacy_note(tok))
    return tok
  found = find_files(path)
  cfg = read_tokenizer_config(path)
  chosen, why = choose_backend(path, found, cfg, backend, legacy)
  tok = _open(chosen, found[chosen], cfg, legacy, special_tokens if chosen == "tokenizer.json" else {})
  log.info("tokenizer %s: %s back end (%s)%s", path, chosen, why, _legacy_note(tok))
  if len(found) == 2:
    other_kind = "sentencepiece" if chosen == "tokenizer.json" else "tokenizer.json"
    other = _open(other_kind, found[other_kind], cfg, legacy, special_tokens if other_kind == "tokenizer.json" else {})
    from llava_jax.data.templates import probe_texts  # local: templates import nothing from here at module level

    diff = compare_backends(tok, other, probe_texts(template, tokenizer=tok))
    if diff:
      log.warning(
          "tokenizer %s ships tokenizer.json and %s, which disagree on the %s text %s. Using %s; "
          "training and serving must use the same one (load_tokenizer(..., backend=...)). LLaVA trained "
          "Llama-family checkpoints with the sentencepiece one (use_fast=False).",
          path,
          os.path.basename(found["sentencepiece"]),
          f"template {template!r}" if template else "templates'",
          diff,
          chosen,
      )
  return tok


def _legacy_note(tok: Tokenizer) -> str:
  if isinstance(tok, SentencePieceTokenizer):
    return f", legacy={tok.legacy}" + ("" if tok._prefix_once or tok.legacy else " (no dummy prefix: no effect)")
  return ""


def train_sentencepiece(
    sentences: Sequence[str], vocab_size: int, *, user_defined_symbols: Sequence[str] = (), model_type: str = "bpe"
) -> SentencePieceTokenizer:
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
      sentence_iterator=iter(list(sentences)),
      model_writer=buf,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=1.0,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=True,
      split_digits=True,
      user_defined_symbols=list(user_defined_symbols),
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=3,
      num_threads=1,
      shuffle_input_sentence=False,
      hard_vocab_limit=False,
      minloglevel=2,
      max_sentence_length=1 << 16,
  )
  return SentencePieceTokenizer(buf.getvalue(), name="<trained sentencepiece>")
