"""Original haotian-liu/LLaVA checkpoints (LLaVA-1.5 style) -> llava_jax params.

A checkpoint directory holds a ``config.json`` (a LlamaConfig / MistralConfig plus the
``mm_*`` fields) and safetensors with the LLM under ``model.*`` / ``lm_head``, the
projector under ``model.mm_projector`` (``.0`` and ``.2`` for ``mlp2x_gelu``, no index
for ``linear``) and, only in some checkpoints, the CLIP tower under
``model.vision_tower.vision_tower.vision_model.*`` (``vision_model.`` absent when saved
by transformers >= 5). Otherwise the tower is a separate
HF ``CLIPVisionModel`` named by ``mm_vision_tower``; it is read from a local directory
only (``vision_tower_path``, or ``mm_vision_tower`` when that is a directory), never
downloaded.

Settings that affect the inputs, not the weights, stay with the caller
(``prompt_options``): ``image_aspect_ratio`` ("pad" = ``data.images.expand2square`` with
the processor's mean colour), ``mm_use_im_start_end`` / ``mm_use_im_patch_token`` (extra
tokens around the image, part of the resized vocabulary and prompt template).

Image placeholders differ: original LLaVA writes one ``IMAGE_TOKEN_INDEX = -200`` per
image into ``input_ids`` and expands it inside the model; ``Llava`` follows HF (one
``image_token_id`` per image feature). The loaded config uses ``image_token_id =
vocab_size`` (one past the vocabulary: ``Llava`` maps placeholder ids to 0 before the
embedding lookup, so no embedding row is needed and no real token is shadowed);
``expand_image_placeholders`` converts original-style ids.

Pickled ``.bin`` checkpoints are refused (convert them to safetensors first).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np

from llava_jax.checkpoint.convert import common, hf
from llava_jax.checkpoint.convert.common import prefixed
from llava_jax.models.configs import (VISION_VARIANTS, LLMConfig, LlavaConfig, ProjectorConfig, VisionConfig)

log = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200  # original LLaVA's per-image placeholder id (llava/constants.py)

# config.json ``model_type`` -> the LLM family ``hf.llm_config_from_hf`` knows.
_FAMILIES = {
    "llava": "llama",
    "llava_llama": "llama",
    "llama": "llama",
    "llava_mistral": "mistral",
    "mistral": "mistral",
    "llava_qwen": "qwen2",
    "llava_qwen2": "qwen2",
    "qwen2": "qwen2",
}

# Hub towers whose architecture is known without their config.json; enough when the
# tower weights are stored inside the checkpoint.
KNOWN_TOWERS = {"openai/clip-vit-large-patch14-336": "clip-L/14-336", "openai/clip-vit-large-patch14": "clip-L/14"}

_PROJECTOR_NAMES = {"linear": ("mm_projector",), "mlp2x_gelu": ("mm_projector.0", "mm_projector.2"), "identity": ()}
_EMBEDDED_TOWER = "vision_tower.vision_tower."  # + "vision_model." (transformers 4.x)


def _strip_model(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in tensors.items()}


def prompt_options(config: dict) -> dict:
  """Input-side settings of an original LLaVA config.json (see the module docstring)."""
  return {
      "image_aspect_ratio": config.get("image_aspect_ratio", "square"),
      "mm_use_im_start_end": bool(config.get("mm_use_im_start_end", False)),
      "mm_use_im_patch_token": bool(config.get("mm_use_im_patch_token", False)),
      "image_token_index": IMAGE_TOKEN_INDEX,
  }


def expand_image_placeholders(input_ids: Sequence[int], cfg: LlavaConfig) -> list[int]:
  """Original-style ids (one ``-200`` per image) -> ours (``cfg.num_image_tokens`` copies
  of ``cfg.image_token_id`` per image). ``int[T]`` -> ``int[T + images * (N - 1)]``."""
  out: list[int] = []
  for i in input_ids:
    out.extend([cfg.image_token_id] * cfg.num_image_tokens if int(i) == IMAGE_TOKEN_INDEX else [int(i)])
  return out


def _check_supported(d: dict, tensors: dict, path: str):
  if (
      d.get("image_aspect_ratio") == "anyres"
      or "image_newline" in tensors
      or d.get("mm_patch_merge_type", "flat") != "flat"
  ):
    raise ValueError(
        f"{path}: LLaVA-NeXT 'anyres' checkpoints (image_newline, "
        f"mm_patch_merge_type={d.get('mm_patch_merge_type')!r}) are not supported; "
        "only single-tile LLaVA-1.5-style models are"
    )
  kind = d.get("mm_projector_type", "linear")  # LLaVA's own default is linear
  if kind not in _PROJECTOR_NAMES:
    raise ValueError(f"{path}: mm_projector_type {kind!r} not supported; expected one of {sorted(_PROJECTOR_NAMES)}")


def llm_config_from_original(d: dict, tensors: dict, **overrides) -> LLMConfig:
  """LLMConfig from an original config.json (``model_type`` 'llava', 'llava_mistral' …)."""
  family = _FAMILIES.get(d.get("model_type", "llava"))
  if family is None:
    raise ValueError(f"unsupported original LLaVA model_type {d.get('model_type')!r}; known: {sorted(_FAMILIES)}")
  return hf.llm_config_from_hf({**d, "model_type": family}, tie_embeddings="lm_head.weight" not in tensors, **overrides)


def _tower_config_json(tower_dir: str) -> dict:
  d = common.read_json(os.path.join(tower_dir, "config.json"))
  return d.get("vision_config", d) if d.get("model_type") in ("clip", "siglip") else d


def _load_vision(d: dict, embedded: dict, vision_tower_path: str | None, path: str) -> tuple[VisionConfig, common.Flat]:
  """The tower's config and per-layer ``img`` params (flat, without the ``img`` prefix)."""
  select = dict(
      select_layer=d.get("mm_vision_select_layer", -2), select_feature=d.get("mm_vision_select_feature", "patch")
  )
  tower = vision_tower_path or d.get("mm_vision_tower") or d.get("vision_tower")
  local = tower if tower and _is_dir(tower) else None
  if vision_tower_path and local is None:
    raise FileNotFoundError(f"vision_tower_path {vision_tower_path!r} is not a directory")
  if embedded:
    if local is not None:
      cfg = hf.vision_config_from_hf(_tower_config_json(local), **select)
    elif tower in KNOWN_TOWERS:
      cfg = dataclasses.replace(VISION_VARIANTS[KNOWN_TOWERS[tower]], **select)
    else:
      raise FileNotFoundError(
          f"{path} stores the vision tower weights ({_EMBEDDED_TOWER}…) but its architecture "
          f"is unknown: mm_vision_tower {tower!r} is not a local directory nor one of "
          f"{sorted(KNOWN_TOWERS)}; pass vision_tower_path=<dir with the tower's config.json>"
      )
    log.info("%s: using the vision tower weights stored in the checkpoint", path)
    tensors = hf.split_in_proj(embedded, "head.attention.")
    ignore = hf.buffer_keys(tensors)
    flat = common.apply_specs(
        hf.vision_specs(cfg), tensors, f"vision tower inside {path} (keys after {_EMBEDDED_TOWER!r})", ignore
    )
    return cfg, flat
  if local is None:
    raise FileNotFoundError(
        f"vision tower {tower!r} (config.json mm_vision_tower) is not a local directory and "
        f"{path} holds no {_EMBEDDED_TOWER}… weights; pass vision_tower_path=<a HF "
        "CLIPVisionModel directory (config.json + safetensors)>. Nothing is downloaded."
    )
  cfg, params = hf.load_hf_vision(local, scan=False, **select)
  return cfg, common.flatten(params)


def load_llava_original(
    path: str,
    *,
    vision_tower_path: str | None = None,
    vision_overrides: dict | None = None,
    llm_overrides: dict | None = None,
) -> tuple[LlavaConfig, dict]:
  """Loads an original LLaVA checkpoint directory.

  Args:
    path: directory with config.json and ``*.safetensors`` (single or sharded).
    vision_tower_path: local HF ``CLIPVisionModel`` directory; defaults to
      ``mm_vision_tower`` when that is a local directory. Weights stored inside the
      checkpoint (``model.vision_tower.vision_tower.vision_model.*``, e.g. after tuning the
      tower) take precedence; the directory then supplies only the architecture.
    vision_overrides / llm_overrides: non-architectural fields (``scan``, ``remat``,
      ``dtype``, ``attn_impl``).
  Returns:
    ``(LlavaConfig, params)``, params a nested dict of float32 numpy arrays
    ``{"img", "projector", "llm"}``. The vision config takes ``mm_vision_select_layer``
    and ``mm_vision_select_feature`` ("patch" drops CLS, "cls_patch" keeps it);
    ``image_token_id = vocab_size`` (see the module docstring).
  """
  d = common.read_json(os.path.join(path, "config.json"))
  tensors = _strip_model(common.read_checkpoint_dir(path))
  _check_supported(d, tensors, path)
  embedded = {k[len(_EMBEDDED_TOWER) :]: v for k, v in tensors.items() if k.startswith(_EMBEDDED_TOWER)}
  embedded = {k[len("vision_model.") :] if k.startswith("vision_model.") else k: v for k, v in embedded.items()}
  rest = {k: v for k, v in tensors.items() if not k.startswith(_EMBEDDED_TOWER)}
  vision, img = _load_vision(d, embedded, vision_tower_path, path)
  if vision_overrides:
    vision = dataclasses.replace(vision, **vision_overrides)
  llm = llm_config_from_original(d, rest, **(llm_overrides or {}))
  kind = d.get("mm_projector_type", "linear")
  if d.get("mm_hidden_size", vision.width) != vision.width:
    raise ValueError(f"config mm_hidden_size {d['mm_hidden_size']} != vision tower width {vision.width}")
  proj = ProjectorConfig(kind, vision.width, llm.hidden_size, bias=True)
  cfg = LlavaConfig(
      vision=vision, projector=proj, llm=llm, image_token_id=llm.vocab_size, pad_token_id=d.get("pad_token_id") or 0
  )
  specs = prefixed(hf.projector_specs(proj, _PROJECTOR_NAMES[kind]), "", ("projector",)) + prefixed(
      hf.llm_specs(llm) + hf.lm_head_specs(llm), "", ("llm",)
  )
  ignore = hf.buffer_keys(rest)
  flat = common.apply_specs(specs, rest, f"original LLaVA checkpoint {path} (keys without 'model.')", ignore)
  flat.update({("img",) + k: v for k, v in img.items()})
  return cfg, hf.finalize(cfg, flat)


def load_llava_projector(path: str) -> tuple[ProjectorConfig, dict]:
  """Stage-1 (pretraining) output: ``mm_projector`` weights alone.

  Args:
    path: a ``.safetensors`` file (e.g. ``mm_projector.safetensors``) or a directory of
      them, with keys ``[model.]mm_projector.0/.2.{weight,bias}`` (``mlp2x_gelu``) or
      ``[model.]mm_projector.{weight,bias}`` (``linear``).
  Returns:
    ``(ProjectorConfig, params)`` for ``Projector``: ``linear_1/kernel float32[in, out]``,
    ``linear_1/bias float32[out]`` (and ``linear_2`` ``[out, out]`` for mlp2x_gelu).
  """
  tensors = _strip_model(common.read_checkpoint_dir(path))
  if "mm_projector.0.weight" in tensors:
    kind, first = "mlp2x_gelu", tensors["mm_projector.0.weight"]
  elif "mm_projector.weight" in tensors:
    kind, first = "linear", tensors["mm_projector.weight"]
  else:
    raise KeyError(
        f"{path}: no mm_projector.0.weight (mlp2x_gelu) or mm_projector.weight "
        f"(linear); found {sorted(tensors)[:20]}"
    )
  out_dim, in_dim = first.shape
  cfg = ProjectorConfig(kind, in_dim, out_dim, bias="mm_projector.0.bias" in tensors or "mm_projector.bias" in tensors)
  flat = common.apply_specs(
      hf.projector_specs(cfg, _PROJECTOR_NAMES[kind]), tensors, f"projector checkpoint {path} (keys without 'model.')"
  )
  return cfg, common.unflatten(flat)


def _is_dir(path: str) -> bool:
  """A directory, local or on a bucket (a hub id such as openai/clip-… is neither)."""
  from llava_jax import storage

  try:
    return storage.isdir(path)
  except storage.UnsupportedPathError:
    return False
