"""Hugging Face <-> llava_jax: Llava / LlavaNext / LlavaOnevision ForConditionalGeneration,
CLIP/SigLIP vision models and Llama/Mistral/Qwen2/Gemma causal LMs (config.json +
safetensors, single or sharded).

Both LLaVA key layouts load: transformers >= 4.52 (``model.vision_tower…``,
``model.multi_modal_projector…``, ``model.language_model…``, ``model.image_newline``,
``lm_head``) and the hub's older one (``vision_tower[.vision_model]…``,
``language_model.model…``, ``language_model.lm_head``, ``image_newline``), which
transformers 5 still writes. ``save_hf_llava`` writes the newer layout. LLaVA-NeXT and
OneVision (``model_type`` ``llava_next`` / ``llava_onevision``) add ``image_newline`` and
the anyres fields ``image_grid_pinpoints`` (and OneVision's ``vision_aspect_ratio`` and
``video_token_index``, with its bilinear stride-2 frame pooling). LLaVA-NeXT-Video
(``llava_next_video``) is NeXT plus ``video_token_index`` and ``spatial_pool_mode`` /
``spatial_pool_stride`` (average or max; its ``conv`` pooler is not supported).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from llava_jax.checkpoint.convert import common
from llava_jax.checkpoint.convert.common import (
    Spec,
    bias_to_heads,
    conv,
    linear,
    linear_from_heads,
    linear_to_heads,
    prefixed,
    same,
)
from llava_jax.models.configs import (LLMConfig, LlavaConfig, ProjectorConfig, RopeScaling, VisionConfig)

# ----------------------------------------------------------------------------- specs


def _attn_specs(
    src: str,
    dst: tuple[str, ...],
    heads: int,
    kv_heads: int,
    head_dim: int,
    q_bias: bool,
    out_name: str,
    out_bias: bool,
) -> list[Spec]:
  specs = []
  for name, h in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
    specs.append(linear_to_heads(f"{src}{name}.weight", dst + (name, "kernel"), h, head_dim))
    if q_bias:
      specs.append(bias_to_heads(f"{src}{name}.bias", dst + (name, "bias"), h, head_dim))
  specs.append(linear_from_heads(f"{src}{out_name}.weight", dst + (out_name, "kernel"), heads, head_dim))
  if out_bias:
    specs.append(same(f"{src}{out_name}.bias", dst + (out_name, "bias")))
  return specs


def _ln(src: str, dst: tuple[str, ...]) -> list[Spec]:
  return [same(src + ".weight", dst + ("scale",)), same(src + ".bias", dst + ("bias",))]


def _dense(src: str, dst: tuple[str, ...], bias: bool = True) -> list[Spec]:
  return [linear(src + ".weight", dst + ("kernel",))] + ([same(src + ".bias", dst + ("bias",))] if bias else [])


def vision_specs(c: VisionConfig) -> list[Spec]:
  """HF CLIP/SigLIP vision keys (without the ``vision_model.`` prefix) -> ``img`` params."""
  hd = c.width // c.num_heads
  specs = [
      conv("embeddings.patch_embedding.weight", ("patch_embedding", "kernel")),
      same("embeddings.position_embedding.weight", ("position_embedding",)),
  ]
  if c.patch_bias:
    specs.append(same("embeddings.patch_embedding.bias", ("patch_embedding", "bias")))
  if c.class_token:
    specs.append(same("embeddings.class_embedding", ("class_embedding",)))
  if c.pre_norm:
    specs += _ln("pre_layrnorm", ("pre_layrnorm",))
  for i in range(c.depth):
    s, d = f"encoder.layers.{i}.", ("encoder", f"layers_{i}")
    specs += _attn_specs(s + "self_attn.", d + ("self_attn",), c.num_heads, c.num_heads, hd, True, "out_proj", True)
    specs += _ln(s + "layer_norm1", d + ("layer_norm1",)) + _ln(s + "layer_norm2", d + ("layer_norm2",))
    specs += _dense(s + "mlp.fc1", d + ("mlp", "fc1")) + _dense(s + "mlp.fc2", d + ("mlp", "fc2"))
  specs += _ln("post_layernorm", ("post_layernorm",))
  if c.head:
    specs.append(Spec("head.probe", ("head", "probe"), lambda a: a, lambda a: a))
    specs += _attn_specs("head.attention.", ("head", "attention"), c.num_heads, c.num_heads, hd, True, "out_proj", True)
    specs += _ln("head.layernorm", ("head", "layernorm"))
    specs += _dense("head.mlp.fc1", ("head", "mlp", "fc1")) + _dense("head.mlp.fc2", ("head", "mlp", "fc2"))
  return specs


def llm_specs(c: LLMConfig) -> list[Spec]:
  """HF decoder keys (``embed_tokens…``, ``layers.N…``, ``norm``; ``lm_head`` separately)."""
  specs = [same("embed_tokens.weight", ("embed_tokens", "embedding")), same("norm.weight", ("norm", "scale"))]
  for i in range(c.num_layers):
    s, d = f"layers.{i}.", ("decoder", f"layers_{i}")
    specs += _attn_specs(
        s + "self_attn.", d + ("self_attn",), c.num_heads, c.num_kv_heads, c.dim_per_head, c.qkv_bias, "o_proj", False
    )
    specs += [
        same(s + "input_layernorm.weight", d + ("input_layernorm", "scale")),
        same(s + "post_attention_layernorm.weight", d + ("post_attention_layernorm", "scale")),
    ]
    for name in ("gate_proj", "up_proj", "down_proj"):
      specs += _dense(s + f"mlp.{name}", d + ("mlp", name), bias=False)
  return specs


def lm_head_specs(c: LLMConfig) -> list[Spec]:
  return [] if c.tie_embeddings else [linear("lm_head.weight", ("lm_head", "kernel"))]


def projector_specs(c: ProjectorConfig, names=("linear_1", "linear_2")) -> list[Spec]:
  if c.kind == "identity":
    return []
  specs = _dense(names[0], ("linear_1",), c.bias)
  if c.kind == "mlp2x_gelu":
    specs += _dense(names[1], ("linear_2",), c.bias)
  return specs


def split_in_proj(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """torch MultiheadAttention ``in_proj_{weight,bias}`` -> separate q/k/v_proj entries."""
  out = dict(tensors)
  for kind in ("weight", "bias"):
    key = f"{prefix}in_proj_{kind}"
    if key in out:
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(out.pop(key), 3, axis=0)):
        out[f"{prefix}{name}.{kind}"] = part
  return out


def join_in_proj(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  out = dict(tensors)
  for kind in ("weight", "bias"):
    names = [f"{prefix}{n}.{kind}" for n in ("q_proj", "k_proj", "v_proj")]
    if all(n in out for n in names):
      out[f"{prefix}in_proj_{kind}"] = np.concatenate([out.pop(n) for n in names], axis=0)
  return out


# ----------------------------------------------------------------------------- configs

_VISION_ACT = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "gelu_new": "gelu_tanh"}
_LLM_ACT = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}
LLM_FAMILIES = ("llama", "mistral", "qwen2", "gemma")


def vision_config_from_hf(
    d: dict, *, select_layer: int = -1, select_feature: str = "cls_patch", **overrides
) -> VisionConfig:
  kind = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(d.get("model_type"))
  if kind is None:
    raise ValueError(
        f"unsupported vision model_type {d.get('model_type')!r}; expected clip_vision_model or siglip_vision_model"
    )
  act = d.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
  if act not in _VISION_ACT:
    raise ValueError(f"unsupported vision hidden_act {act!r}")
  clip = kind == "clip"
  return VisionConfig(
      kind=kind,
      image_size=d["image_size"],
      patch_size=d["patch_size"],
      width=d["hidden_size"],
      depth=d["num_hidden_layers"],
      mlp_dim=d["intermediate_size"],
      num_heads=d["num_attention_heads"],
      layer_norm_eps=d.get("layer_norm_eps", 1e-5 if clip else 1e-6),
      act=_VISION_ACT[act],
      class_token=clip,
      pre_norm=clip,
      patch_bias=not clip,
      head=(not clip) and d.get("vision_use_head", True),
      select_layer=select_layer,
      select_feature=select_feature,
      **overrides,
  )


def vision_config_to_hf(c: VisionConfig) -> dict:
  d = {
      "model_type": f"{c.kind}_vision_model",
      "hidden_size": c.width,
      "intermediate_size": c.mlp_dim,
      "num_hidden_layers": c.depth,
      "num_attention_heads": c.num_heads,
      "image_size": c.image_size,
      "patch_size": c.patch_size,
      "num_channels": 3,
      "layer_norm_eps": c.layer_norm_eps,
      "hidden_act": {"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[c.act],
  }
  if c.kind == "siglip":
    d["vision_use_head"] = c.head
  return d


def _rope_from_hf(d: dict) -> tuple[float, RopeScaling | None]:
  rp = d.get("rope_parameters") or {}
  theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
  scaling = d.get("rope_scaling") or rp
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "llama3":
    return theta, RopeScaling(
        "llama3",
        scaling["factor"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
        scaling["original_max_position_embeddings"],
    )
  if kind == "linear":
    return theta, RopeScaling("linear", scaling["factor"])
  raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def llm_config_from_hf(d: dict, *, tie_embeddings: bool | None = None, **overrides) -> LLMConfig:
  family = d.get("model_type")
  if family not in LLM_FAMILIES:
    raise ValueError(f"unsupported text model_type {family!r}; supported {LLM_FAMILIES}")
  if d.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported")
  if family in ("llama", "mistral") and d.get("attention_bias"):
    raise ValueError("attention_bias=True (biased o_proj) is not supported")
  act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
  if family == "gemma" and act == "gelu":  # HF Gemma maps legacy "gelu" to the tanh form
    act = "gelu_pytorch_tanh"
  theta, scaling = _rope_from_hf(d)
  sliding = d.get("sliding_window")
  if family == "qwen2" and not d.get("use_sliding_window", False):
    sliding = None
  heads = d["num_attention_heads"]
  head_dim = d.get("head_dim")
  if head_dim == d["hidden_size"] // heads:
    head_dim = None  # the default; keeps configs equal across a round trip
  tie = d.get("tie_word_embeddings", family == "gemma") if tie_embeddings is None else tie_embeddings
  return LLMConfig(
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      act=_LLM_ACT[act],
      qkv_bias=family == "qwen2",
      tie_embeddings=tie,
      embed_scale=family == "gemma",
      norm_plus_one=family == "gemma",
      sliding_window=sliding,
      max_position_embeddings=d.get("max_position_embeddings", 4096),
      **overrides,
  )


def llm_family(c: LLMConfig) -> str:
  if c.norm_plus_one:
    return "gemma"
  if c.qkv_bias:
    return "qwen2"
  return "mistral" if c.sliding_window else "llama"


def llm_config_to_hf(c: LLMConfig) -> dict:
  family = llm_family(c)
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    r = c.rope_scaling
    rope.update(rope_type=r.kind, factor=r.factor)
    if r.kind == "llama3":
      rope.update(
          low_freq_factor=r.low_freq_factor,
          high_freq_factor=r.high_freq_factor,
          original_max_position_embeddings=r.original_max_position,
      )
  d = {
      "model_type": family,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.dim_per_head,
      "rms_norm_eps": c.rms_norm_eps,
      "max_position_embeddings": c.max_position_embeddings,
      "rope_parameters": rope,
      "tie_word_embeddings": c.tie_embeddings,
      "hidden_act": {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[c.act],
  }
  if family == "gemma":
    d["hidden_activation"] = d["hidden_act"]
  if family == "mistral":
    d["sliding_window"] = c.sliding_window
  if family == "qwen2":
    d["use_sliding_window"] = bool(c.sliding_window)
    d["sliding_window"] = c.sliding_window
  return d


# ----------------------------------------------------------------------------- llava

_LLAVA_PREFIXES = (  # (old prefix, canonical prefix); first match wins
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.image_newline", "image_newline"),
)

# model_type -> (architecture, defaults of the fields transformers may leave out of config.json)
LLAVA_TYPES = {
    "llava": ("LlavaForConditionalGeneration", {}),
    "llava_next": (
        "LlavaNextForConditionalGeneration",
        {
            "vision_feature_layer": -2,
            "image_token_id": 32000,
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        },
    ),
    "llava_next_video": (
        "LlavaNextVideoForConditionalGeneration",
        {
            "vision_feature_layer": -2,
            "image_token_id": 32001,
            "video_token_id": 32000,
            "spatial_pool_mode": "average",
            "spatial_pool_stride": 2,
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        },
    ),
    "llava_onevision": (
        "LlavaOnevisionForConditionalGeneration",
        {
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "image_token_id": 151646,
            "video_token_id": 151647,
            "vision_aspect_ratio": "anyres_max_9",
            "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        },
    ),
}


# Buffers older transformers versions saved with the weights; recomputed, never learned.
_BUFFER_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")


def buffer_keys(tensors) -> list[str]:
  return [k for k in tensors if k.endswith(_BUFFER_SUFFIXES)]


def canonical_llava_keys(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tensors.items():
    for old, new in _LLAVA_PREFIXES:
      if k.startswith(old):
        k = new + k[len(old) :]
        break
    out[k] = v
  return out


def llava_specs(cfg: LlavaConfig) -> list[Spec]:
  return (
      prefixed(vision_specs(cfg.vision), "vision_tower.", ("img",))
      + prefixed(projector_specs(cfg.projector), "multi_modal_projector.", ("projector",))
      + prefixed(llm_specs(cfg.llm), "language_model.", ("llm",))
      + prefixed(lm_head_specs(cfg.llm), "", ("llm",))
      + ([same("image_newline", ("image_newline",))] if cfg.anyres else [])
  )


def llava_config_from_hf(d: dict, tensors: dict | None = None, **llm_overrides) -> LlavaConfig:
  model_type = d.get("model_type", "llava")
  if model_type not in LLAVA_TYPES:
    raise ValueError(f"unsupported LLaVA model_type {model_type!r}; supported {tuple(LLAVA_TYPES)}")
  d = {**LLAVA_TYPES[model_type][1], **d}  # image_token_id: read after image_token_index
  anyres = {}
  if model_type != "llava":
    anyres["image_grid_pinpoints"] = d["image_grid_pinpoints"]
  if model_type == "llava_onevision":
    anyres["vision_aspect_ratio"] = d["vision_aspect_ratio"]
    # transformers pools every video frame's grid to half its side (apply_pooling).
    video_token = d.get("video_token_index", d.get("video_token_id"))
    anyres.update(video_token_id=video_token, video_pooling="bilinear", video_pool_stride=2)
  if model_type == "llava_next_video":
    if d["spatial_pool_mode"] not in ("average", "max"):
      raise ValueError(f"spatial_pool_mode {d['spatial_pool_mode']!r}: only 'average' and 'max' are supported")
    video_token = d.get("video_token_index", d.get("video_token_id"))
    anyres.update(
        video_token_id=video_token, video_pooling=d["spatial_pool_mode"], video_pool_stride=d["spatial_pool_stride"]
    )
  strategy = d.get("vision_feature_select_strategy", "default")
  vd = d["vision_config"]
  if strategy == "default" and vd.get("model_type") == "siglip_vision_model":
    raise ValueError(
        "vision_feature_select_strategy='default' drops the first token, which "
        "for a SigLIP tower (no class token) is a real patch; use 'full'"
    )
  layer = d.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ValueError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
  vision = vision_config_from_hf(
      vd, select_layer=layer, select_feature="patch" if strategy == "default" else "cls_patch"
  )
  tie = None if tensors is None else "lm_head.weight" not in tensors
  llm = llm_config_from_hf(d["text_config"], tie_embeddings=tie, **llm_overrides)
  if d.get("projector_hidden_act", "gelu") != "gelu":
    raise ValueError(f"projector_hidden_act {d['projector_hidden_act']!r}: only 'gelu' supported")
  proj = ProjectorConfig("mlp2x_gelu", vision.width, llm.hidden_size, bias=d.get("multimodal_projector_bias", True))
  image_token = d.get("image_token_index", d.get("image_token_id"))
  pad = d.get("pad_token_id", d["text_config"].get("pad_token_id")) or 0
  return LlavaConfig(vision=vision, projector=proj, llm=llm, image_token_id=image_token, pad_token_id=pad, **anyres)


def finalize(cfg: LlavaConfig, flat: common.Flat) -> dict:
  """Stacks scanned layers and checks every param against the model's init shapes."""
  from llava_jax.models.llava import init_params

  if cfg.vision.scan:
    flat = common.stack_layers(flat, ("img", "encoder"), cfg.vision.depth)
  if cfg.llm.scan:
    flat = common.stack_layers(flat, ("llm", "decoder"), cfg.llm.num_layers)
  expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  common.check_shapes(flat, expected, "LLaVA")
  return common.unflatten(flat)


def load_hf_llava(
    path: str, *, vision_overrides: dict | None = None, llm_overrides: dict | None = None
) -> tuple[LlavaConfig, dict]:
  """Loads a HF ``Llava`` / ``LlavaNext`` / ``LlavaNextVideo`` / ``LlavaOnevision`` ``ForConditionalGeneration`` directory.

  Returns ``(LlavaConfig, params)`` with params a nested dict of float32 numpy arrays
  ``{"img", "projector", "llm"}``. Overrides set non-architectural config fields
  (``scan``, ``remat``, ``dtype``, ``attn_impl``).
  """
  d = common.read_json(os.path.join(path, "config.json"))
  tensors = canonical_llava_keys(common.read_checkpoint_dir(path))
  tensors = split_in_proj(tensors, "vision_tower.head.attention.")
  cfg = llava_config_from_hf(d, tensors, **(llm_overrides or {}))
  if vision_overrides:
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision_overrides))
  flat = common.apply_specs(llava_specs(cfg), tensors, f"LLaVA checkpoint {path}", buffer_keys(tensors))
  return cfg, finalize(cfg, flat)


def _flat_params(params: dict) -> common.Flat:
  flat = common.flatten(params)
  flat = common.unstack_layers(flat, ("img", "encoder"))
  return common.unstack_layers(flat, ("llm", "decoder"))


def save_hf_llava(cfg: LlavaConfig, params: dict, path: str, *, dtype=np.float32, max_shard_bytes: int | None = None):
  """Writes a directory that ``transformers.LlavaForConditionalGeneration`` loads
  (``LlavaNext…`` for an anyres config, ``LlavaOnevision…`` if it has ``vision_aspect_ratio``,
  ``LlavaNextVideo…`` if it pools video frames by average or max)."""
  if cfg.projector.kind != "mlp2x_gelu":
    raise ValueError(f"HF LLaVA has only the mlp2x_gelu projector, not {cfg.projector.kind!r}")
  if cfg.video_pooling == "bilinear" and (cfg.vision_aspect_ratio is None or cfg.video_pool_stride != 2):
    raise ValueError(
        "HF has bilinear video pooling only in OneVision (stride 2, with vision_aspect_ratio); this config has "
        f"stride {cfg.video_pool_stride}, vision_aspect_ratio {cfg.vision_aspect_ratio!r}"
    )
  if cfg.video_pooling in ("average", "max") and cfg.vision_aspect_ratio is not None:
    raise ValueError(f"HF OneVision pools video bilinearly, not by {cfg.video_pooling!r}")
  tensors = common.invert_specs(llava_specs(cfg), _flat_params(params), dtype)
  tensors = join_in_proj(tensors, "vision_tower.head.attention.")
  renamed = {}
  for k, v in tensors.items():
    prefix = "" if k.startswith("lm_head.") else "model."
    renamed[prefix + k] = v
  common.write_safetensors_dir(renamed, path, max_shard_bytes)
  v = cfg.vision
  text = llm_config_to_hf(cfg.llm)
  text["pad_token_id"] = cfg.pad_token_id
  model_type, extra = "llava", {}
  if cfg.anyres:
    model_type = "llava_next" if cfg.vision_aspect_ratio is None else "llava_onevision"
    if cfg.video_pooling in ("average", "max"):
      model_type = "llava_next_video"
      extra.update(spatial_pool_mode=cfg.video_pooling, spatial_pool_stride=cfg.video_pool_stride)
    extra["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    if cfg.vision_aspect_ratio is not None:
      extra["vision_aspect_ratio"] = cfg.vision_aspect_ratio
  if cfg.video_token_id is not None:
    extra["video_token_index"] = cfg.video_token_id
  common.write_json(
      {
          **extra,
          "architectures": [LLAVA_TYPES[model_type][0]],
          "model_type": model_type,
          "vision_config": vision_config_to_hf(v),
          "text_config": text,
          "image_token_index": cfg.image_token_id,
          "image_seq_length": cfg.num_image_tokens,
          "projector_hidden_act": "gelu",
          "multimodal_projector_bias": cfg.projector.bias,
          "vision_feature_layer": v.select_layer,
          "vision_feature_select_strategy": "default" if v.select_feature == "patch" else "full",
          "tie_word_embeddings": cfg.llm.tie_embeddings,
          "pad_token_id": cfg.pad_token_id,
      },
      os.path.join(path, "config.json"),
  )


# ----------------------------------------------------------------------------- standalone

_NON_VISION_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias")


def load_hf_vision(path: str, **overrides) -> tuple[VisionConfig, dict]:
  """HF ``CLIPVisionModel`` / ``SiglipVisionModel`` (or the vision half of ``CLIPModel`` /
  ``SiglipModel``, whose text tower is left out). Returns ``(VisionConfig, img params)``;
  the config selects the last layer with all tokens (``tower`` gives HF's outputs)."""
  from llava_jax.models.vit import VisionTransformer

  d = common.read_json(os.path.join(path, "config.json"))
  d = d.get("vision_config", d) if d.get("model_type") in ("clip", "siglip") else d
  raw = common.read_checkpoint_dir(path)
  tensors = {k[len("vision_model.") :] if k.startswith("vision_model.") else k: v for k, v in raw.items()}
  ignore = [k for k in tensors if k.startswith(_NON_VISION_PREFIXES)] + buffer_keys(tensors)
  tensors = split_in_proj(tensors, "head.attention.")
  cfg = vision_config_from_hf(d, **overrides)
  flat = common.apply_specs(vision_specs(cfg), tensors, f"vision checkpoint {path}", ignore)
  if cfg.scan:
    flat = common.stack_layers(flat, ("encoder",), cfg.depth)
  px = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), np.float32)
  expected = jax.eval_shape(lambda x: VisionTransformer(cfg).init(jax.random.key(0), x), px)
  import flax.linen as nn

  common.check_shapes(flat, nn.unbox(expected)["params"], "vision tower")
  return cfg, common.unflatten(flat)


def load_hf_llm(path: str, **overrides) -> tuple[LLMConfig, dict]:
  """HF ``{Llama,Mistral,Qwen2,Gemma}ForCausalLM`` -> ``(LLMConfig, llm params)``."""
  import flax.linen as nn
  from llava_jax.models.llm import init_llm

  d = common.read_json(os.path.join(path, "config.json"))
  raw = common.read_checkpoint_dir(path)
  tensors = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in raw.items()}
  cfg = llm_config_from_hf(d, tie_embeddings="lm_head.weight" not in tensors, **overrides)
  flat = common.apply_specs(
      llm_specs(cfg) + lm_head_specs(cfg), tensors, f"LLM checkpoint {path}", buffer_keys(tensors)
  )
  if cfg.scan:
    flat = common.stack_layers(flat, ("decoder",), cfg.num_layers)
  expected = jax.eval_shape(lambda: init_llm(cfg, jax.random.key(0), boxed=True))
  common.check_shapes(flat, nn.unbox(expected), "LLM")
  return cfg, common.unflatten(flat)
