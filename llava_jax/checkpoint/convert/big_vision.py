"""big_vision ``.npz`` checkpoints -> llava_jax params: SigLIP towers and PaliGemma.

big_vision saves params as one ``.npz`` whose keys are the nested param names joined
with ``/`` (``params/img/Transformer/encoderblock_0/LayerNorm_0/scale``). Keys may or may
not carry the leading ``params/``; a nested dict (``big_vision.utils.load_params``) is
accepted too. Both encoder layouts load: one sub-tree per block (``encoderblock_{i}``)
and the scanned one (``encoderblock``, every leaf with a leading layer axis); likewise
Gemma's ``layers`` (scanned, as PaliGemma ships) or ``layers_{i}``.

Flax already stores ``[in, out]`` kernels and ``[E, H, D]`` / ``[H, D, E]`` attention
kernels, so the ViT maps name to name without transposes; Gemma's einsum weights are
re-laid out (see ``gemma_specs``). Architecture is read from array shapes, never from
names. Every key is either consumed or explicitly ignored (and logged); a missing or
unexpected key is an error that names it. Loading only: no ``.npz`` export.

Einsum letters: L layers, E width, H heads, K kv heads, D head dim, F mlp, V vocab,
N patches, p patch size.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np

from llava_jax.checkpoint.convert import common, hf
from llava_jax.checkpoint.convert.common import Spec, prefixed, same
from llava_jax.models.configs import LLMConfig, LlavaConfig, ProjectorConfig, VisionConfig

log = logging.getLogger(__name__)

# big_vision ``vit.decode_variant``: name -> (width, depth, mlp_dim, num_heads).
VIT_VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

# The image model's own classifier / projection head, which the tower's outputs do not
# use (PaliGemma's ``img/head`` becomes the projector in ``load_paligemma_npz``).
_IMG_HEAD = "img/head/"


# ----------------------------------------------------------------------------- reading


def read_npz(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flat ``{"img/…": array}`` from a ``.npz`` path, an ``np.load`` result, a flat dict or a
  nested dict. A leading ``params/`` is stripped; bfloat16 stored as raw 2-byte void
  (numpy has no bfloat16) is viewed back as bfloat16."""
  if isinstance(path_or_dict, (str, os.PathLike)):
    from llava_jax import storage  # a gs:// .npz is copied to the local cache once

    with np.load(storage.local_copy(path_or_dict), allow_pickle=False) as f:
      src = {k: f[k] for k in f.files}
  else:
    src = dict(path_or_dict)
  flat: dict[str, np.ndarray] = {}

  def add(key: str, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        add(f"{key}/{k}" if key else str(k), v)
      return
    key = key[len("params/") :] if key.startswith("params/") else key
    a = np.asarray(value)
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:
      a = a.view(ml_dtypes.bfloat16)
    if key in flat:
      raise KeyError(f"checkpoint key {key!r} appears both with and without 'params/'")
    flat[key] = a

  add("", src)
  return flat


def _layout(tensors: Mapping[str, np.ndarray], scanned: str, per_block: str) -> tuple[str, int]:
  """Which layer layout a checkpoint uses and its depth.

  ``scanned`` is the stacked prefix (``img/Transformer/encoderblock/``); ``per_block`` the
  per-layer one with ``{i}``. Returns (``"scanned"`` | ``"blocks"``, depth)."""
  stacked = sorted(k for k in tensors if k.startswith(scanned))
  pat = re.compile(re.escape(per_block).replace(r"\{i\}", r"(\d+)"))
  blocks = {int(m.group(1)) for k in tensors if (m := pat.match(k))}
  if stacked and blocks:
    raise KeyError(
        f"checkpoint mixes scanned keys ({stacked[0]!r}, …) and per-block keys "
        f"({per_block.format(i=min(blocks))!r}, …)"
    )
  if stacked:
    depths = {tensors[k].shape[0] if tensors[k].ndim else 0 for k in stacked}
    if len(depths) != 1:
      bad = {k: tensors[k].shape for k in stacked}
      raise ValueError(f"scanned keys under {scanned!r} disagree on the leading layer axis: {bad}")
    return "scanned", depths.pop()
  if blocks:
    return "blocks", max(blocks) + 1
  raise KeyError(f"no layer keys: expected {scanned!r}… or {per_block.format(i=0)!r}…; found {sorted(tensors)[:20]}")


def _first_layer(tensors, layout: str, scanned: str, per_block: str, rest: str) -> np.ndarray:
  """Layer 0's leaf ``rest`` (the shape one block has), whichever the layout."""
  key = scanned + rest if layout == "scanned" else per_block.format(i=0) + rest
  if key not in tensors:
    raise KeyError(f"checkpoint lacks {key!r}, needed to infer the architecture")
  a = tensors[key]
  return a[0] if layout == "scanned" else a


def _get(tensors, key: str) -> np.ndarray:
  if key not in tensors:
    raise KeyError(f"checkpoint lacks {key!r}, needed to infer the architecture")
  return tensors[key]


def _log_ignored(ignored: list[str], what: str):
  if ignored:
    groups = sorted({"/".join(k.split("/")[:2]) for k in ignored})
    log.warning("%s: ignoring %d keys not part of the image tower (%s)", what, len(ignored), groups)


# ----------------------------------------------------------------------------- SigLIP


def _ln(src: str, dst: tuple[str, ...]) -> list[Spec]:
  return [same(src + "/scale", dst + ("scale",)), same(src + "/bias", dst + ("bias",))]


def _dense(src: str, dst: tuple[str, ...]) -> list[Spec]:
  return [same(src + "/kernel", dst + ("kernel",)), same(src + "/bias", dst + ("bias",))]


def _mha(src: str, dst: tuple[str, ...]) -> list[Spec]:
  """flax MultiHeadDotProductAttention: query/key/value kernel [E, H, D], bias [H, D];
  out kernel [H, D, E] -- our layout exactly (with or without a leading L axis)."""
  names = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj"))
  return [s for bv, ours in names for s in _dense(f"{src}/{bv}", dst + (ours,))]


def _mlp(src: str, dst: tuple[str, ...]) -> list[Spec]:
  return _dense(src + "/Dense_0", dst + ("fc1",)) + _dense(src + "/Dense_1", dst + ("fc2",))


def _encoder_block(src: str, dst: tuple[str, ...]) -> list[Spec]:
  return (
      _ln(src + "LayerNorm_0", dst + ("layer_norm1",))
      + _mha(src + "MultiHeadDotProductAttention_0", dst + ("self_attn",))
      + _ln(src + "LayerNorm_1", dst + ("layer_norm2",))
      + _mlp(src + "MlpBlock_0", dst + ("mlp",))
  )


def siglip_specs(c: VisionConfig, layout: str) -> list[Spec]:
  """big_vision ViT keys (relative to ``img/``) -> VisionTransformer params.

  ``layout="scanned"`` maps ``Transformer/encoderblock/…`` to the stacked
  ``encoder/layers/…``; ``"blocks"`` maps ``encoderblock_{i}`` to ``encoder/layers_{i}``.
  """
  specs = [
      same("embedding/kernel", ("patch_embedding", "kernel")),  # [p, p, 3, E] both
      Spec(
          "pos_embedding",
          ("position_embedding",),  # [1, N, E] -> [N, E]
          lambda a: a.reshape(a.shape[-2:]),
          lambda a: a[None],
      ),
  ]
  if c.patch_bias:
    specs.append(same("embedding/bias", ("patch_embedding", "bias")))
  if layout == "scanned":
    specs += _encoder_block("Transformer/encoderblock/", ("encoder", "layers"))
  else:
    for i in range(c.depth):
      specs += _encoder_block(f"Transformer/encoderblock_{i}/", ("encoder", f"layers_{i}"))
  specs += _ln("Transformer/encoder_norm", ("post_layernorm",))
  if c.head:  # MAP head: LN and MLP after attention pooling, as HF's SigLIP head
    specs += [
        same("MAPHead_0/probe", ("head", "probe")),
        *_mha("MAPHead_0/MultiHeadDotProductAttention_0", ("head", "attention")),
        *_ln("MAPHead_0/LayerNorm_0", ("head", "layernorm")),
        *_mlp("MAPHead_0/MlpBlock_0", ("head", "mlp")),
    ]
  return specs


def _encoder_layout(tensors) -> tuple[str, int]:
  return _layout(tensors, "img/Transformer/encoderblock/", "img/Transformer/encoderblock_{i}/")


def siglip_config_from_npz(
    tensors: Mapping[str, np.ndarray], *, variant: str | None = None, **overrides
) -> VisionConfig:
  """Reads a SigLIP VisionConfig off the array shapes of ``img/…`` keys.

  Width and patch from ``embedding/kernel [p, p, 3, E]``, depth from the layer keys, heads
  from the query kernel ``[E, H, D]``, mlp from ``Dense_0/kernel [E, F]``, image size
  ``sqrt(N) * p`` from ``pos_embedding [1, N, E]`` (pass ``image_size=384`` for
  So400m/14-384, whose 27x27 patches cover only 378 px). ``variant`` (``"So400m/14"``) is a
  cross-check; ``overrides`` set other VisionConfig fields (``scan``, ``dtype``, ``select_layer`` …).
  """
  if "img/cls" in tensors:
    raise ValueError(
        "img/cls: big_vision's class-token ViT (pool_type='tok') adds position "
        "embeddings before the class token, which this ViT does not model"
    )
  layout, depth = _encoder_layout(tensors)
  block = lambda rest: _first_layer(
      tensors, layout, "img/Transformer/encoderblock/", "img/Transformer/encoderblock_{i}/", rest
  )
  kh, kw, ch, width = _get(tensors, "img/embedding/kernel").shape
  if kh != kw or ch != 3:
    raise ValueError(f"img/embedding/kernel has shape {(kh, kw, ch, width)}: expected [p, p, 3, E]")
  pos = _get(tensors, "img/pos_embedding")
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width:
    raise ValueError(
        f"img/pos_embedding has shape {pos.shape}: expected [1, N, {width}] "
        "(learned position embeddings; sincos2d towers have none)"
    )
  side = math.isqrt(pos.shape[1])
  if side * side != pos.shape[1]:
    raise ValueError(f"img/pos_embedding has {pos.shape[1]} positions, not a square grid")
  heads = block("MultiHeadDotProductAttention_0/query/kernel").shape[1]
  mlp = block("MlpBlock_0/Dense_0/kernel").shape[1]
  image_size = overrides.pop("image_size", side * kh)
  if image_size // kh != side:
    raise ValueError(
        f"image_size {image_size} with patch {kh} gives {image_size // kh} patches "
        f"per side; img/pos_embedding has {side}"
    )
  if variant is not None:
    check_variant(variant, width=width, depth=depth, mlp_dim=mlp, num_heads=heads, patch_size=kh)
  fields = dict(
      kind="siglip",
      image_size=image_size,
      patch_size=kh,
      width=width,
      depth=depth,
      mlp_dim=mlp,
      num_heads=heads,
      layer_norm_eps=1e-6,
      act="gelu_tanh",
      class_token=False,
      pre_norm=False,
      patch_bias="img/embedding/bias" in tensors,
      head="img/MAPHead_0/probe" in tensors,
      select_layer=-1,
      select_feature="cls_patch",
  )
  return VisionConfig(**{**fields, **overrides})


def check_variant(variant: str, **found: int):
  """Raises ValueError listing every field where the shapes disagree with ``variant``."""
  name, _, patch = variant.partition("/")
  if name not in VIT_VARIANTS:
    raise ValueError(f"unknown big_vision variant {variant!r}; known: {sorted(VIT_VARIANTS)}")
  want = dict(zip(("width", "depth", "mlp_dim", "num_heads"), VIT_VARIANTS[name]))
  if patch:
    want["patch_size"] = int(patch)
  bad = {k: (found[k], v) for k, v in want.items() if found[k] != v}
  if bad:
    raise ValueError(f"checkpoint does not match variant {variant!r}: (found, expected) {bad}")


def _vision_params(cfg: VisionConfig, flat: common.Flat) -> dict:
  """Per-layer or stacked ``encoder`` params -> the layout ``cfg.scan`` asks for, shape-checked."""
  import flax.linen as nn
  from llava_jax.models.vit import VisionTransformer

  flat = common.unstack_layers(flat, ("encoder",))
  if cfg.scan:
    flat = common.stack_layers(flat, ("encoder",), cfg.depth)
  px = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), np.float32)
  expected = jax.eval_shape(lambda x: VisionTransformer(cfg).init(jax.random.key(0), x), px)
  common.check_shapes(flat, nn.unbox(expected)["params"], "SigLIP tower")
  return common.unflatten(flat)


def load_siglip_npz(path_or_dict, *, variant: str | None = None, **overrides) -> tuple[VisionConfig, dict]:
  """Loads the image tower of a big_vision SigLIP (or PaliGemma) checkpoint.

  Args:
    path_or_dict: ``.npz`` path or (flat ``/``-joined or nested) dict of arrays, keys with
      or without ``params/``. ``txt/``, ``t``, ``b``, ``llm/`` and the image model's
      ``img/head`` (image-text / LLM projection) are ignored and logged.
    variant: optional big_vision name (``"So400m/14"``) checked against the shapes.
    overrides: VisionConfig fields (``scan``, ``remat``, ``dtype``, ``image_size`` …).
  Returns:
    ``(VisionConfig, params)``: params for ``VisionTransformer`` (float32 numpy), config
    ``select_layer=-1`` with all tokens (SigLIP has no class token), so ``tower`` gives
    ``(last_hidden_state float[B, N, E], pooled float[B, E])`` as HF's SiglipVisionModel.
  """
  tensors = read_npz(path_or_dict)
  cfg = siglip_config_from_npz(tensors, variant=variant, **overrides)
  # Non-image parts (SigLIP's ``txt/``, ``t``, ``b``; PaliGemma's ``llm/``) and img/head.
  ignored = sorted(k for k in tensors if not k.startswith("img/") or k.startswith(_IMG_HEAD))
  _log_ignored(ignored, "SigLIP npz")
  layout, _ = _encoder_layout(tensors)
  specs = prefixed(siglip_specs(cfg, layout), "img/", ())
  flat = common.apply_specs(specs, tensors, "big_vision SigLIP checkpoint (keys without 'params/')", ignore=ignored)
  return cfg, _vision_params(cfg, flat)


# ----------------------------------------------------------------------------- Gemma


def _load_only(src: str, dst: tuple[str, ...], fn: Callable[[np.ndarray], np.ndarray]) -> Spec:
  def no_export(_):
    raise NotImplementedError(f"{src}: exporting to big_vision npz is not supported")

  return Spec(src, dst, fn, no_export)


def gemma_specs(c: LLMConfig, layout: str, *, fused_qkv: bool, gating_fe: bool) -> list[Spec]:
  """big_vision Gemma keys (relative to ``llm/``) -> Decoder params.

  Per layer (``[L]`` leading when scanned; ellipses below keep that axis):
    ``attn/q_einsum/w [H, E, D]`` -> ``q_proj/kernel [E, H, D]``;
    ``attn/kv_einsum/w [2, K, E, D]`` -> k/v ``[E, K, D]`` (``qkv_einsum/w [3, H, E, D]``
    when H == K); ``attn/attn_vec_einsum/w [H, D, E]`` = ``o_proj/kernel``;
    ``mlp/gating_einsum [2, E, F]`` -> gate (0) and up (1) ``[E, F]`` (``[2, F, E]`` in
    newer gemma releases: ``gating_fe``); ``mlp/linear [F, E]`` = ``down_proj/kernel``;
    ``pre_attention_norm`` / ``pre_ffw_norm`` -> ``input_layernorm`` /
    ``post_attention_layernorm`` (both Gemma's ``(1 + w)`` form).
  """
  heads_first = lambda a: np.swapaxes(a, -3, -2)  # [..., H, E, D] -> [..., E, H, D]
  pick = lambda j, fn: (lambda a: fn(a[..., j, :, :, :]))
  pick2 = lambda j: ((lambda a: np.swapaxes(a[..., j, :, :], -1, -2)) if gating_fe else (lambda a: a[..., j, :, :]))

  def block(s: str, d: tuple[str, ...]) -> list[Spec]:
    a = d + ("self_attn",)
    if fused_qkv:
      specs = [
          _load_only(s + "attn/qkv_einsum/w", a + (n, "kernel"), pick(j, heads_first))
          for j, n in enumerate(("q_proj", "k_proj", "v_proj"))
      ]
    else:
      specs = [_load_only(s + "attn/q_einsum/w", a + ("q_proj", "kernel"), heads_first)]
      specs += [
          _load_only(s + "attn/kv_einsum/w", a + (n, "kernel"), pick(j, heads_first))
          for j, n in enumerate(("k_proj", "v_proj"))
      ]
    specs += [
        same(s + "attn/attn_vec_einsum/w", a + ("o_proj", "kernel")),
        _load_only(s + "mlp/gating_einsum", d + ("mlp", "gate_proj", "kernel"), pick2(0)),
        _load_only(s + "mlp/gating_einsum", d + ("mlp", "up_proj", "kernel"), pick2(1)),
        same(s + "mlp/linear", d + ("mlp", "down_proj", "kernel")),
        same(s + "pre_attention_norm/scale", d + ("input_layernorm", "scale")),
        same(s + "pre_ffw_norm/scale", d + ("post_attention_layernorm", "scale")),
    ]
    return specs

  specs = [same("embedder/input_embedding", ("embed_tokens", "embedding")), same("final_norm/scale", ("norm", "scale"))]
  if layout == "scanned":
    return specs + block("layers/", ("decoder", "layers"))
  for i in range(c.num_layers):
    specs += block(f"layers_{i}/", ("decoder", f"layers_{i}"))
  return specs


def gemma_config_from_npz(tensors: Mapping[str, np.ndarray], **overrides) -> tuple[LLMConfig, str, bool, bool]:
  """Gemma LLMConfig from ``llm/…`` shapes; returns (config, layout, fused_qkv, gating_fe).

  Not in the shapes, set to Gemma 1 values: ``rope_theta=10000``, ``rms_norm_eps=1e-6``,
  ``max_position_embeddings=8192`` (``overrides`` change them).
  """
  layout, depth = _layout(tensors, "llm/layers/", "llm/layers_{i}/")
  first = "llm/layers/" if layout == "scanned" else "llm/layers_0/"
  if any(k.startswith(first + n) for k in tensors for n in ("post_attention_norm", "post_ffw_norm")):
    raise ValueError(
        f"{first}post_attention_norm: a Gemma 2 LLM (PaliGemma 2: post-norms, "
        "logit soft-capping, local attention) is not supported"
    )
  layer = lambda rest: _first_layer(tensors, layout, "llm/layers/", "llm/layers_{i}/", rest)
  vocab, width = _get(tensors, "llm/embedder/input_embedding").shape
  fused = first + "attn/qkv_einsum/w" in tensors
  if fused:
    _, heads, _, head_dim = layer("attn/qkv_einsum/w").shape
    kv_heads = heads
  else:
    heads, _, head_dim = layer("attn/q_einsum/w").shape
    kv_heads = layer("attn/kv_einsum/w").shape[1]
  mlp, _ = layer("mlp/linear").shape
  gating = layer("mlp/gating_einsum").shape
  gating_fe = gating[1:] == (mlp, width) and mlp != width
  fields = dict(
      vocab_size=vocab,
      hidden_size=width,
      intermediate_size=mlp,
      num_layers=depth,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rope_theta=10000.0,
      rms_norm_eps=1e-6,
      act="gelu_tanh",
      tie_embeddings=True,
      embed_scale=True,
      norm_plus_one=True,
      max_position_embeddings=8192,
  )
  return LLMConfig(**{**fields, **overrides}), layout, fused, gating_fe


# ----------------------------------------------------------------------------- PaliGemma


def load_paligemma_npz(
    path_or_dict,
    *,
    llm_overrides: dict | None = None,
    vision_overrides: dict | None = None,
    fold_image_scale: bool = True,
) -> tuple[LlavaConfig, dict]:
  """Loads a big_vision PaliGemma (1) checkpoint into our LLaVA layout.

  ``img/…`` (SigLIP, no MAP head) -> ``img``; ``img/head/{kernel [E_vit, E], bias [E]}``
  (PaliGemma's linear map to the LLM width) -> a ``linear`` ``projector``; ``llm/…``
  (Gemma) -> ``llm`` with ``embed_scale``, ``norm_plus_one``, GeGLU (tanh) and tied
  embeddings. The config selects the last SigLIP layer with all N tokens
  (``select_layer=-1``, ``cls_patch``) and ``image_token_id = vocab_size`` (as HF's
  PaliGemma ``<image>`` id 257152; our model maps placeholders to id 0 before the lookup,
  so the id needs no embedding row).

  What a user gets is PaliGemma's *weights* in LLaVA's *forward*, which differs in three ways:

  * Features: PaliGemma projects the tower's *post-LayerNorm* output (``encoder_norm``),
    so the config sets ``VisionConfig.feature_norm=True`` (LLaVA itself projects
    ``hidden_states[select_layer]`` before ``post_layernorm``).
  * Image scale: big_vision and transformers >= 5 multiply only the *text* embeddings by
    sqrt(E) and insert image features unscaled (transformers 4.x divided the features by
    sqrt(E) and then scaled everything: the same thing). ``Llava`` merges first, then its
    Gemma ``embed_scale`` multiplies image features too. With ``fold_image_scale=True``
    (default) the projector kernel and bias are divided by ``float32(sqrt(E))``, which
    undoes that exactly (up to float32 rounding); ``False`` keeps the raw ``img/head``.
  * Attention: PaliGemma's prefix (image + prompt) attends bidirectionally, the suffix
    causally; ``Llava`` is causal over the whole sequence.

  With these, ``Llava(cfg).apply({"params": p}, ids, px)`` gives PaliGemma's logits under
  a causal mask (HF ``PaliGemmaForConditionalGeneration`` without ``token_type_ids``;
  the test checks 1e-4); the bidirectional prefix additionally needs
  ``kernels.attention``'s ``prefix_len``, which ``Llava`` does not pass.

  Position ids: big_vision counts from 0, HF PaliGemma from 1; RoPE is relative, so both
  give the same logits. Returns ``(LlavaConfig, params)`` as float32 numpy nested dicts.
  """
  tensors = read_npz(path_or_dict)
  vision = siglip_config_from_npz(tensors, **{"feature_norm": True, **(vision_overrides or {})})
  if vision.head:
    raise ValueError(
        "img/MAPHead_0: PaliGemma's tower has no MAP head (pool_type 'none'); "
        "this looks like a SigLIP image-text checkpoint (use load_siglip_npz)"
    )
  head = _get(tensors, "img/head/kernel")
  llm, llm_layout, fused, gating_fe = gemma_config_from_npz(tensors, **(llm_overrides or {}))
  if head.shape != (vision.width, llm.hidden_size):
    raise ValueError(
        f"img/head/kernel has shape {head.shape}: expected "
        f"[{vision.width}, {llm.hidden_size}] (vision width, LLM width)"
    )
  proj = ProjectorConfig("linear", vision.width, llm.hidden_size, bias=True)
  cfg = LlavaConfig(vision=vision, projector=proj, llm=llm, image_token_id=llm.vocab_size, pad_token_id=0)
  img_layout, _ = _encoder_layout(tensors)
  specs = (
      prefixed(siglip_specs(vision, img_layout), "img/", ("img",))
      + [
          same("img/head/kernel", ("projector", "linear_1", "kernel")),
          same("img/head/bias", ("projector", "linear_1", "bias")),
      ]
      + prefixed(gemma_specs(llm, llm_layout, fused_qkv=fused, gating_fe=gating_fe), "llm/", ("llm",))
  )
  flat = common.apply_specs(specs, tensors, "big_vision PaliGemma checkpoint (keys without 'params/')")
  if fold_image_scale:
    s = np.float32(np.sqrt(llm.hidden_size))
    for leaf in ("kernel", "bias"):
      key = ("projector", "linear_1", leaf)
      flat[key] = (flat[key] / s).astype(np.float32)
  flat = common.unstack_layers(flat, ("img", "encoder"))
  flat = common.unstack_layers(flat, ("llm", "decoder"))
  return cfg, hf.finalize(cfg, flat)
