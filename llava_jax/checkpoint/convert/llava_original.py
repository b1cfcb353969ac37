"""Original LLaVA checkpoints (haotian-liu/LLaVA 1.5, LLaVA-NeXT v1.6 and lmms-lab
LLaVA-OneVision, as the LLaVA-NeXT repository saves them) -> llava_jax params.

A checkpoint directory holds a ``config.json`` (a Llama / Mistral / Qwen2 config plus the
``mm_*`` fields; the family comes from ``model_type`` ``llava_llama`` / ``llava_mistral``
/ ``llava_qwen``, or from ``architectures`` ``Llava{Llama,Mistral,Qwen}ForCausalLM`` when
``model_type`` is plain ``llava``, as in lmms-lab's configs) and safetensors with the LLM
under ``model.*`` / ``lm_head``, the projector under ``model.mm_projector`` (``.0`` and
``.2`` for ``mlp2x_gelu``, no index for ``linear``) and, in checkpoints that tuned it, the
vision tower under ``model.vision_tower.vision_tower.vision_model.*`` (``vision_model.``
absent when saved by transformers >= 5). Otherwise the tower is a separate HF
``CLIPVisionModel`` / ``SiglipVisionModel`` named by ``mm_vision_tower``; it is read from
a local directory only (``vision_tower_path``, or ``mm_vision_tower`` when that is a
directory), never downloaded. Hub towers in ``KNOWN_TOWERS`` need no directory when the
weights are in the checkpoint.

Vision features: a CLIP tower gives ``hidden_states[mm_vision_select_layer]``, minus the
class token for ``mm_vision_select_feature="patch"``. A SigLIP tower follows LLaVA-NeXT's
``SigLipVisionTower``, which ignores both fields: it deletes the tower's last encoder
layer and its head, and takes every token of the new last layer (before
``post_layernorm``). The loaded config is that truncated tower (OneVision's so400m: 26 of
27 layers, ``select_layer=-1``, ``select_feature="cls_patch"``), as transformers'
OneVision conversion has it; a stored last layer or head is dropped with a log line.

Any resolution (LLaVA-NeXT, OneVision): ``image_aspect_ratio`` "anyres" or
"anyres_max_N" with ``mm_patch_merge_type="spatial_unpad"`` and a ``model.image_newline``
weight load as an anyres ``LlavaConfig`` (``llava_jax.models.anyres``: base tile first,
the unpadded tile grid with ``image_newline`` after each row, OneVision's bilinear shrink
to ~N tiles' worth). ``image_grid_pinpoints`` is a list of pairs (or its ``str``), or a
range such as "(1x1),...,(6x6)": every grid from the first to the last times the tower's
image size. Original pinpoints are ``[width, height]`` (``llava/mm_utils.py``); they are
stored as our ``(height, width)`` in the original order, which decides ties (all images
within one tile pick the first smallest grid: LLaVA-NeXT's ``[336, 672]`` is 2 rows x 1
column). Other merge types ("flat" with anyres, "spatial", "spatial_unpad_nobase",
"maxpool2x2" …) and ``image_aspect_ratio`` "highres" / "crop_split" are refused. Video
settings: OneVision's (``mm_spatial_pool_mode="bilinear"``, ``mm_newline_position=
"one_token"``) give the loaded model a video token (``video_options``: a video is one
``<video>`` tag and ``video_token_id = vocab_size + 1`` placeholders); others are logged
and not read. One rounding differs from the original: its
``unpad_image`` truncates ``height * scale`` where transformers (and ``models.anyres``)
round to 7 decimals first, so for rare sizes (36 of the 1.44M sizes up to 1200 x 1200
under LLaVA-NeXT's pinpoints, e.g. 55 x 176) the original crops one more feature row or
column on each side.

Settings that affect the inputs, not the weights, stay with the caller
(``prompt_options``): ``image_aspect_ratio`` ("pad" = ``data.images.expand2square`` with
the processor's mean colour; "anyres*" = ``data.anyres.preprocess_anyres`` with the
config's pinpoints), ``mm_use_im_start_end`` / ``mm_use_im_patch_token`` (extra tokens
around the image, part of the resized vocabulary and prompt template).

Image placeholders differ: original LLaVA writes one ``IMAGE_TOKEN_INDEX = -200`` per
image into ``input_ids`` and expands it inside the model; ``Llava`` follows HF (one
``image_token_id`` per image feature). The loaded config uses ``image_token_id =
vocab_size`` (one past the vocabulary: ``Llava`` maps placeholder ids to 0 before the
embedding lookup, so no embedding row is needed and no real token is shadowed);
``expand_image_placeholders`` converts original-style ids.

Pickled ``.bin`` checkpoints are refused (convert them to safetensors first).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import re
from typing import Sequence

import numpy as np

from llava_jax.checkpoint.convert import common, hf
from llava_jax.checkpoint.convert.common import prefixed, same
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
# ``architectures[0]`` -> family, read when ``model_type`` is the generic "llava" (lmms-lab's
# OneVision configs say "llava" with LlavaQwenForCausalLM).
_ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
    "LlavaQwen2ForCausalLM": "qwen2",
}

# Hub towers whose architecture is known without their config.json; enough when the
# tower weights are stored inside the checkpoint.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": "clip-L/14-336",
    "openai/clip-vit-large-patch14": "clip-L/14",
    "google/siglip-so400m-patch14-384": "siglip-So400m/14-384",  # OneVision
}

_PROJECTOR_NAMES = {"linear": ("mm_projector",), "mlp2x_gelu": ("mm_projector.0", "mm_projector.2"), "identity": ()}
_EMBEDDED_TOWER = "vision_tower.vision_tower."  # + "vision_model." (transformers 4.x)
_MERGE_TYPES = ("flat", "spatial_unpad")
_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")
_GRID = re.compile(r"\((\d+)x(\d+)\)")


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


def expand_image_placeholders(
    input_ids: Sequence[int], cfg: LlavaConfig, image_sizes: Sequence[Sequence[int]] | None = None
) -> list[int]:
  """Original-style ids (one ``-200`` per image) -> ours (copies of ``cfg.image_token_id``).

  LLaVA-1.5 configs: ``cfg.num_image_tokens`` copies per image, ``image_sizes`` unused.
  Anyres configs: image k takes ``models.anyres.num_image_tokens(image_sizes[k], cfg)``
  copies, ``image_sizes`` the images' original ``(height, width)`` in order (as
  ``data.anyres.preprocess_anyres`` returns them; original LLaVA's own ``image_sizes`` are
  PIL ``(width, height)``). Several images in one sequence of a OneVision config take
  its multi-image mode (``models.anyres.square_images``), as the model does for a row.
  """
  ids = [int(i) for i in input_ids]
  count = sum(i == IMAGE_TOKEN_INDEX for i in ids)
  if cfg.anyres:
    from llava_jax.models import anyres

    if image_sizes is None or len(image_sizes) != count:
      got = "none" if image_sizes is None else len(image_sizes)
      raise ValueError(
          f"an anyres config needs one image size (height, width) per {IMAGE_TOKEN_INDEX} placeholder: the ids "
          f"have {count}, image_sizes {got}"
      )
    square = anyres.square_images(cfg, count)
    counts = iter([anyres.num_image_tokens(tuple(int(x) for x in s), cfg, square) for s in image_sizes])
  else:
    counts = iter([cfg.num_image_tokens] * count)
  out: list[int] = []
  for i in ids:
    out.extend([cfg.image_token_id] * next(counts) if i == IMAGE_TOKEN_INDEX else [i])
  return out


def _is_anyres(ratio) -> bool:
  return isinstance(ratio, str) and (ratio == "anyres" or "anyres_max" in ratio)  # llava/mm_utils.py


def _check_supported(d: dict, tensors: dict, path: str):
  where = os.path.join(path, "config.json")
  merge = d.get("mm_patch_merge_type", "flat")
  ratio = d.get("image_aspect_ratio", "square")
  if merge not in _MERGE_TYPES:
    raise ValueError(
        f"{where}: mm_patch_merge_type {merge!r} is not supported; only 'flat' (LLaVA-1.5) and "
        "'spatial_unpad' (LLaVA-NeXT / OneVision: unpadded tile grid, image_newline, base tile first) are"
    )
  if ratio in ("highres", "crop_split"):
    raise ValueError(f"{where}: image_aspect_ratio {ratio!r} (several tiles, flat merge) is not supported")
  if _is_anyres(ratio) != (merge == "spatial_unpad"):
    raise ValueError(
        f"{where}: image_aspect_ratio {ratio!r} with mm_patch_merge_type {merge!r} is not supported; "
        "anyres ('anyres' / 'anyres_max_N') goes with 'spatial_unpad', other ratios with 'flat'"
    )
  if _is_anyres(ratio) and ratio != "anyres" and not _ANYRES_MAX.fullmatch(ratio):
    raise ValueError(f"{where}: image_aspect_ratio {ratio!r}: expected 'anyres' or 'anyres_max_<N>'")
  if "image_newline" in tensors and merge != "spatial_unpad":
    raise ValueError(f"{path}: an image_newline weight, but mm_patch_merge_type is {merge!r}, not 'spatial_unpad'")
  kind = d.get("mm_projector_type", "linear")  # LLaVA's own default is linear
  if kind not in _PROJECTOR_NAMES:
    raise ValueError(f"{where}: mm_projector_type {kind!r} not supported; expected one of {sorted(_PROJECTOR_NAMES)}")


def grid_pinpoints_from_original(value, tile: int, where: str = "config.json") -> tuple[tuple[int, int], ...]:
  """An original ``image_grid_pinpoints`` -> our ``((height, width), ...)``, order kept.

  Args:
    value: ``[[width, height], ...]``, that list as a ``str``, or a range string
      ``"(AxB),...,(CxD)"``: every ``(i * tile, j * tile)`` for i in A..C, j in B..D
      (``llava/mm_utils.py``: only the first and last grids count).
    tile: the vision tower's image size.
    where: named in errors (the config file).
  """

  def bad(why: str):
    return ValueError(
        f"{where}: image_grid_pinpoints {value!r} {why}; expected [[width, height], ...] or a range "
        "like '(1x1),...,(6x6)'"
    )

  pairs = value
  if isinstance(value, str):
    if "x" in value:
      parts = [p.strip() for p in value.split(",")]
      if not all(_GRID.fullmatch(p) or p == "..." for p in parts) or not (
          _GRID.fullmatch(parts[0]) and _GRID.fullmatch(parts[-1])
      ):
        raise bad("is not a range of '(AxB)' grids")
      (a, b), (c, e) = (tuple(map(int, _GRID.fullmatch(parts[k]).groups())) for k in (0, -1))
      pairs = [(i * tile, j * tile) for i in range(max(a, 1), c + 1) for j in range(max(b, 1), e + 1)]
      if not pairs or min(a, b) < 1:
        raise bad("holds no grid")
    else:
      try:
        pairs = ast.literal_eval(value)
      except (ValueError, SyntaxError) as err:
        raise bad("is not a list of pairs") from err
  if (
      not isinstance(pairs, (list, tuple))
      or not pairs
      or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in pairs)
  ):
    raise bad("is not a non-empty list of [width, height] pairs")
  return tuple((int(h), int(w)) for w, h in pairs)


def anyres_options(d: dict, tile: int, path: str) -> dict:
  """The ``LlavaConfig`` anyres fields of an original config.json ({} unless anyres)."""
  ratio = d.get("image_aspect_ratio", "square")
  if not _is_anyres(ratio):
    return {}
  where = os.path.join(path, "config.json")
  if d.get("image_grid_pinpoints") is None:
    raise ValueError(f"{where}: image_aspect_ratio {ratio!r} but no image_grid_pinpoints")
  return {
      "image_grid_pinpoints": grid_pinpoints_from_original(d["image_grid_pinpoints"], tile, where),
      "vision_aspect_ratio": None if ratio == "anyres" else ratio,
  }


def video_options(d: dict, vocab_size: int, path: str) -> dict:
  """The ``LlavaConfig`` video fields of an original config.json ({} for a model without videos).

  The original (``llava_arch.py``) marks a video with one ``<image>`` and ``modalities=["video"]``:
  each frame goes through the tower and the projector, the projected grid is pooled by
  ``get_2dPool`` (``mm_spatial_pool_mode``, ``mm_spatial_pool_stride``), and with
  ``mm_newline_position="one_token"`` (its default) and a ``spatial_unpad`` merge the frames'
  tokens are followed by one ``image_newline``. That is OneVision's video path in
  transformers and ``models.video``'s ``"bilinear"`` pooling, so a bilinear checkpoint loads
  with ``video_token_id = vocab_size + 1`` (a placeholder outside the vocabulary, as the image
  one). No ``mm_spatial_pool_mode`` (LLaVA-1.5 / NeXT v1.6: the original cannot take a video)
  gives {}; so do settings ``models.video`` does not implement ("average" / "max" after the
  projector, a newline per grid row or frame, ``add_faster_video``, a resampler), logged with
  the reason: a video given to such a model is then read as its frames, one image each.
  """
  if "mm_spatial_pool_mode" not in d:
    return {}
  where = os.path.join(path, "config.json")
  mode, stride = d["mm_spatial_pool_mode"], d.get("mm_spatial_pool_stride", 2)  # get_2dPool(stride=2)
  newline = d.get("mm_newline_position", "one_token")
  why = None
  if d.get("mm_patch_merge_type", "flat") != "spatial_unpad":
    why = f"mm_patch_merge_type {d.get('mm_patch_merge_type', 'flat')!r} (a video's newline needs 'spatial_unpad')"
  elif mode != "bilinear":
    why = f"mm_spatial_pool_mode {mode!r} pools after the projector; only 'bilinear' is implemented"
  elif newline != "one_token":
    why = f"mm_newline_position {newline!r}; only 'one_token' (one image_newline after a video) is implemented"
  elif d.get("add_faster_video"):
    why = "add_faster_video is set"
  elif d.get("mm_resampler_type"):
    why = f"mm_resampler_type {d['mm_resampler_type']!r}"
  elif not isinstance(stride, int) or stride < 1:
    why = f"mm_spatial_pool_stride {stride!r} is not a positive int"
  if why:
    log.warning("%s: videos are not read as the original reads them (%s); a video is taken as its frames", where, why)
    return {}
  return {"video_token_id": vocab_size + 1, "video_pooling": "bilinear", "video_pool_stride": stride}


def _family(d: dict) -> str | None:
  model_type = d.get("model_type", "llava")
  arch = (d.get("architectures") or [None])[0]
  if model_type == "llava" and arch in _ARCHITECTURES:
    return _ARCHITECTURES[arch]
  return _FAMILIES.get(model_type)


def llm_config_from_original(d: dict, tensors: dict, **overrides) -> LLMConfig:
  """LLMConfig from an original config.json (``model_type`` 'llava', 'llava_mistral' …)."""
  family = _family(d)
  if family is None:
    raise ValueError(f"unsupported original LLaVA model_type {d.get('model_type')!r}; known: {sorted(_FAMILIES)}")
  return hf.llm_config_from_hf({**d, "model_type": family}, tie_embeddings="lm_head.weight" not in tensors, **overrides)


def _tower_config_json(tower_dir: str) -> dict:
  d = common.read_json(os.path.join(tower_dir, "config.json"))
  return d.get("vision_config", d) if d.get("model_type") in ("clip", "siglip") else d


def _siglip_as_original(full: VisionConfig) -> VisionConfig:
  """LLaVA-NeXT's SigLipVisionTower: the last layer and the head deleted, the new last
  layer's tokens taken as they are (no post_layernorm, nothing dropped)."""
  return dataclasses.replace(full, depth=full.depth - 1, head=False, select_layer=-1, select_feature="cls_patch")


def _drop_siglip_tail(tensors: dict, depth: int, what: str) -> dict:
  """Removes the last layer (index ``depth``, the full tower's last) and the head."""
  drop = [k for k in tensors if k.startswith((f"encoder.layers.{depth}.", "head."))]
  if drop:
    log.info("%s: dropping %d keys of the last layer and head, unused by LLaVA's SigLIP tower", what, len(drop))
  return {k: v for k, v in tensors.items() if k not in drop}


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
      full = hf.vision_config_from_hf(_tower_config_json(local))
    elif tower in KNOWN_TOWERS:
      full = VISION_VARIANTS[KNOWN_TOWERS[tower]]
    else:
      raise FileNotFoundError(
          f"{path} stores the vision tower weights ({_EMBEDDED_TOWER}…) but its architecture "
          f"is unknown: mm_vision_tower {tower!r} is not a local directory nor one of "
          f"{sorted(KNOWN_TOWERS)}; pass vision_tower_path=<dir with the tower's config.json>"
      )
    log.info("%s: using the vision tower weights stored in the checkpoint", path)
    what = f"vision tower inside {path} (keys after {_EMBEDDED_TOWER!r})"
    if full.kind == "siglip":
      cfg = _siglip_as_original(full)
      embedded = _drop_siglip_tail(embedded, cfg.depth, what)
    else:
      cfg = dataclasses.replace(full, **select)
    tensors = hf.split_in_proj(embedded, "head.attention.")
    ignore = hf.buffer_keys(tensors)
    return cfg, common.apply_specs(hf.vision_specs(cfg), tensors, what, ignore)
  if local is None:
    raise FileNotFoundError(
        f"vision tower {tower!r} (config.json mm_vision_tower) is not a local directory and "
        f"{path} holds no {_EMBEDDED_TOWER}… weights; pass vision_tower_path=<a HF "
        "CLIPVisionModel / SiglipVisionModel directory (config.json + safetensors)>. Nothing is downloaded."
    )
  if _tower_config_json(local).get("model_type") == "siglip_vision_model":
    full, params = hf.load_hf_vision(local, scan=False)
    cfg = _siglip_as_original(full)
    flat = {
        k: v
        for k, v in common.flatten(params).items()
        if k[0] != "head" and k[:2] != ("encoder", f"layers_{cfg.depth}")
    }
    log.info("%s: SigLIP tower from %s without its last layer and head (as LLaVA's SigLipVisionTower)", path, local)
    return cfg, flat
  cfg, params = hf.load_hf_vision(local, scan=False, **select)
  return cfg, common.flatten(params)


def load_llava_original(
    path: str,
    *,
    vision_tower_path: str | None = None,
    vision_overrides: dict | None = None,
    llm_overrides: dict | None = None,
) -> tuple[LlavaConfig, dict]:
  """Loads an original LLaVA / LLaVA-NeXT / LLaVA-OneVision checkpoint directory.

  Args:
    path: directory with config.json and ``*.safetensors`` (single or sharded).
    vision_tower_path: local HF ``CLIPVisionModel`` / ``SiglipVisionModel`` directory (the
      full hub tower); defaults to ``mm_vision_tower`` when that is a local directory.
      Weights stored inside the checkpoint (``model.vision_tower.vision_tower.vision_model.*``,
      e.g. after tuning the tower) take precedence; the directory then supplies only the
      architecture.
    vision_overrides / llm_overrides: non-architectural fields (``scan``, ``remat``,
      ``dtype``, ``attn_impl``).
  Returns:
    ``(LlavaConfig, params)``, params a nested dict of float32 numpy arrays
    ``{"img", "projector", "llm"}`` (plus ``image_newline`` for anyres). A CLIP tower's
    config takes ``mm_vision_select_layer`` and ``mm_vision_select_feature`` ("patch"
    drops CLS, "cls_patch" keeps it); a SigLIP tower is truncated as the original does
    (see the module docstring). Anyres checkpoints get ``image_grid_pinpoints`` (as
    ``(height, width)``) and, for "anyres_max_N", ``vision_aspect_ratio``; OneVision's
    bilinear video settings give the video fields (``video_options``).
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
      vision=vision,
      projector=proj,
      llm=llm,
      image_token_id=llm.vocab_size,
      pad_token_id=d.get("pad_token_id") or 0,
      **anyres_options(d, vision.image_size, path),
      **video_options(d, llm.vocab_size, path),
  )
  specs = prefixed(hf.projector_specs(proj, _PROJECTOR_NAMES[kind]), "", ("projector",)) + prefixed(
      hf.llm_specs(llm) + hf.lm_head_specs(llm), "", ("llm",)
  )
  if cfg.anyres:
    specs.append(same("image_newline", ("image_newline",)))
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
