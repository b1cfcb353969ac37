"""Where a checkpoint's tokenizer is, and which back end opens it (for `tokenizer.load_tokenizer`).

    found = find_files(directory)           # {"tokenizer.json": path, "sentencepiece": path}
    cfg = read_tokenizer_config(directory)  # special tokens, legacy, added tokens, chat template
    backend, why = choose_backend(directory, found, cfg)

The files. A checkpoint directory ships a Hugging Face `tokenizer.json`
(`tokenizers`), a sentencepiece model (`tokenizer.model`, else the
directory's only `*.model`), or both, beside `tokenizer_config.json`,
`special_tokens_map.json`, `added_tokens.json` and maybe a chat template
(`chat_template.jinja` / `.json`), which `read_tokenizer_config` reads. A
file named directly is opened by the back end its name says (`file_backend`).

Which back end (`choose_backend`; the rule is explained in
`llava_jax.tokenizer`'s docstring): the only one shipped; of two,
`tokenizer.json`, unless `tokenizer_config.json` says `"legacy": false` and
the `tokenizer.json` prefixes "▁" to every stretch between special tokens
anyway (`_json_prefixes_every_stretch`): then the sentencepiece model.
`backend=` overrides. Opening the files, and comparing the two back ends when
both are shipped, are `llava_jax.tokenizer`'s.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from llava_jax import storage

SPIECE_UNDERLINE = "\u2581"
BACKENDS = ("auto", "sentencepiece", "tokenizer.json")


def _token_content(value) -> str | None:
  """tokenizer_config.json stores a token as a string or as {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_json(path: str) -> dict:
  if not storage.exists(path):
    return {}
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_tokenizer_config(directory: str) -> dict:
  """What the back ends need from a checkpoint directory's tokenizer files.

  Returns a dict with (each present only if the files say):
    "bos_token", "eos_token", "pad_token", "unk_token": str or None
      (`tokenizer_config.json` wins over `special_tokens_map.json`);
    "legacy": bool; "added_tokens": list of {"id", "content", "special",
      "lstrip", "rstrip"} (`added_tokens_decoder`, then `added_tokens.json`);
    "chat_template": str (`chat_template.jinja`, else `tokenizer_config.json`'s
      "chat_template" (a string, or a list of {"name", "template"}: "default"),
      else `chat_template.json`, as processors save it).
  """
  out: dict[str, Any] = {}
  for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
    cfg = _read_json(os.path.join(directory, fname))
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
      if key in cfg:
        out[key] = _token_content(cfg[key])
  cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
  if isinstance(cfg.get("legacy"), bool):
    out["legacy"] = cfg["legacy"]
  added = {}
  for i, t in (cfg.get("added_tokens_decoder") or {}).items():
    added[int(i)] = {
        "id": int(i),
        "content": t["content"],
        "special": bool(t.get("special", True)),
        "lstrip": bool(t.get("lstrip", False)),
        "rstrip": bool(t.get("rstrip", False)),
    }
  for content, i in _read_json(os.path.join(directory, "added_tokens.json")).items():
    added.setdefault(int(i), {"id": int(i), "content": content, "special": True, "lstrip": False, "rstrip": False})
  if added:
    out["added_tokens"] = [added[i] for i in sorted(added)]
  jinja = os.path.join(directory, "chat_template.jinja")
  template = cfg.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if storage.exists(jinja):
    template = storage.read_text(jinja)
  if template is None:
    template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
  if isinstance(template, str):
    out["chat_template"] = template
  return out


def _json_prefixes_every_stretch(path: str) -> bool:
  """Whether a tokenizer.json puts "▁" before every stretch between added tokens (HF legacy=True behaviour)."""
  spec = _read_json(path)

  def parts(node):
    if not node:
      return []
    if node.get("type") == "Sequence":
      return [p for sub in node.get("normalizers", node.get("pretokenizers", [])) for p in parts(sub)]
    return [node]

  for n in parts(spec.get("normalizer")):
    if n.get("type") == "Prepend" and n.get("prepend") == SPIECE_UNDERLINE:
      return True
  for p in parts(spec.get("pre_tokenizer")):
    if p.get("type") == "Metaspace":
      scheme = p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never")
      return scheme == "always"
  return False


def find_files(directory: str) -> dict[str, str]:
  """{"tokenizer.json": path, "sentencepiece": path} for the files a checkpoint directory ships;
  FileNotFoundError if it ships neither."""
  found = {}
  names = set(storage.listdir(directory))
  if "tokenizer.json" in names:
    found["tokenizer.json"] = os.path.join(directory, "tokenizer.json")
  if "tokenizer.model" in names:
    found["sentencepiece"] = os.path.join(directory, "tokenizer.model")
  else:
    models = sorted(f for f in names if f.endswith(".model"))
    if len(models) == 1:
      found["sentencepiece"] = os.path.join(directory, models[0])
  if not found:
    raise FileNotFoundError(f"no tokenizer.json or single *.model in {directory}: found {storage.listdir(directory)}")
  return found


def file_backend(path: str, backend: str = "auto") -> str:
  """The back end of a tokenizer file named directly: "tokenizer.json" for a `.json`, else
  "sentencepiece"; ValueError if `backend` asks for the other one."""
  kind = "tokenizer.json" if path.endswith(".json") else "sentencepiece"
  if backend not in ("auto", kind):
    raise ValueError(f"backend={backend!r} but {path} is a {kind} file")
  return kind


def choose_backend(
    directory: str, found: Mapping[str, str], cfg: Mapping, backend: str = "auto", legacy: bool | None = None
) -> tuple[str, str]:
  """(back end, why) for a directory's `found` files (module docstring); `cfg` its
  `read_tokenizer_config`, `legacy` the caller's override of its `"legacy"`."""
  if backend != "auto":
    if backend not in found:
      raise FileNotFoundError(f"backend={backend!r}: {directory} has no such file (it has {sorted(found)})")
    return backend, "asked for"
  if len(found) == 1:
    return next(iter(found)), "the only tokenizer file"
  if cfg.get("legacy") is False and legacy is not True and _json_prefixes_every_stretch(found["tokenizer.json"]):
    return "sentencepiece", (
        'tokenizer_config.json says "legacy": false, which its tokenizer.json does '
        'not implement (it prefixes "▁" after every special token)'
    )
  return "tokenizer.json", "as AutoTokenizer loads it"
