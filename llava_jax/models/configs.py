"""Typed, frozen model configs and the VARIANTS tables (big_vision style).

Configs are plain frozen dataclasses so they can be static arguments of ``jax.jit`` and
round-trip through JSON (``to_dict`` / ``from_dict``) next to checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


def _check(ok: bool, what: str):
  if not ok:
    raise ValueError(f"invalid config: {what}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """ViT tower. ``kind="clip"``: class token, pre-LN, quick_gelu; ``"siglip"``: no class
  token, tanh-GELU, optional MAP head."""

  kind: str = "clip"
  image_size: int = 336
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  mlp_dim: int = 4096
  num_heads: int = 16
  layer_norm_eps: float = 1e-5
  act: str = "quick_gelu"  # "quick_gelu" | "gelu_tanh" | "gelu"
  class_token: bool = True
  pre_norm: bool = True  # CLIP's `pre_layrnorm`
  patch_bias: bool = False  # CLIP's patch conv has no bias, SigLIP's has
  head: bool = False  # SigLIP MAP (attention-pooling) head
  # LLaVA feature selection: hidden state index as in HF `hidden_states[select_layer]`
  # (0 = embeddings, -1 = last layer); only the layers needed are computed.
  select_layer: int = -2
  select_feature: str = "patch"  # "patch" drops the class token, "cls_patch" keeps it
  feature_norm: bool = False  # apply post_layernorm to the selected features (PaliGemma)
  attn_impl: str = "xla"
  scan: bool = False
  remat: str = "none"  # "none" | "full" | "dots" (checkpoint policy)
  dtype: str = "float32"  # compute dtype; params stay float32

  def __post_init__(self):
    _check(self.kind in ("clip", "siglip"), f"vision kind {self.kind!r}")
    _check(self.act in ("quick_gelu", "gelu_tanh", "gelu"), f"vision act {self.act!r}")
    _check(self.select_feature in ("patch", "cls_patch"), f"select_feature {self.select_feature!r}")
    # No divisibility check: So400m/14 at 384 px uses floor(384/14) = 27 patches per side
    # (a VALID conv drops the remainder), as big_vision and HF do.
    _check(self.width % self.num_heads == 0, f"width {self.width} % heads {self.num_heads}")
    _check(self.dtype in _DTYPES, f"dtype {self.dtype!r}")
    _check(
        -self.depth - 1 <= self.select_layer <= self.depth,
        f"select_layer {self.select_layer} out of range for depth {self.depth}",
    )

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_layers_used(self) -> int:
    """How many encoder layers produce ``hidden_states[select_layer]``."""
    return self.select_layer if self.select_layer >= 0 else self.depth + 1 + self.select_layer

  @property
  def num_features(self) -> int:
    """Image tokens handed to the projector per image."""
    keep_cls = self.class_token and self.select_feature == "cls_patch"
    return self.num_patches + int(keep_cls)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  kind: str = "mlp2x_gelu"  # "linear" | "mlp2x_gelu" | "identity"
  in_dim: int = 1024
  out_dim: int = 4096
  bias: bool = True

  def __post_init__(self):
    _check(self.kind in ("linear", "mlp2x_gelu", "identity"), f"projector kind {self.kind!r}")
    _check(
        self.kind != "identity" or self.in_dim == self.out_dim,
        f"identity projector needs in_dim == out_dim, got {self.in_dim} vs {self.out_dim}",
    )


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 (``kind="llama3"``) or linear position-interpolation RoPE scaling."""

  kind: str = "llama3"  # "llama3" | "linear"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Decoder LLM; families are flags, not subclasses:
  Llama/Vicuna (defaults), Mistral (``sliding_window``), Qwen2 (``qkv_bias``),
  Gemma (``embed_scale``, ``norm_plus_one``, ``act="gelu_tanh"``, ``head_dim``, tied)."""

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None  # default hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  act: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU) | "gelu"
  qkv_bias: bool = False
  tie_embeddings: bool = False
  embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden_size)
  norm_plus_one: bool = False  # Gemma: RMSNorm weight applied as (1 + w)
  sliding_window: int | None = None
  max_position_embeddings: int = 4096
  attn_impl: str = "xla"
  scan: bool = True
  remat: str = "full"
  dtype: str = "float32"

  def __post_init__(self):
    _check(
        self.num_heads % self.num_kv_heads == 0,
        f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}",
    )
    _check(self.act in ("silu", "gelu_tanh", "gelu"), f"llm act {self.act!r}")
    _check(self.dtype in _DTYPES, f"dtype {self.dtype!r}")
    _check(self.remat in ("none", "full", "dots"), f"remat {self.remat!r}")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  vision: VisionConfig = VisionConfig()
  projector: ProjectorConfig = ProjectorConfig()
  llm: LLMConfig = LLMConfig()
  image_token_id: int = 32000
  pad_token_id: int = 0
  # Verify placeholder count == image feature count inside jit too (a scalar host
  # callback); eager calls are always checked.
  check_image_tokens: bool = True
  # Any resolution (LLaVA-NeXT / OneVision, ``llava_jax.models.anyres``); None: LLaVA-1.5,
  # one S x S tile per image. ((H, W), ...) candidate resolutions, multiples of S.
  image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
  # "anyres_max_N" (OneVision): bilinearly shrink a tile grid of more than ~N tiles of
  # tokens; None (NeXT): keep the whole unpadded grid.
  vision_aspect_ratio: str | None = None
  # Fixed-shape budgets per image slot (None: the most any image can need):
  # tiles (base included) and image tokens after packing.
  max_tiles_per_image: int | None = None
  max_image_tokens: int | None = None
  # Videos (``llava_jax.models.video``), all three set or all None: the placeholder id,
  # how a frame's patch grid is pooled ("bilinear": OneVision, "average" / "max":
  # NeXT-Video) and the pooling stride.
  video_token_id: int | None = None
  video_pooling: str | None = None
  video_pool_stride: int | None = None

  def __post_init__(self):
    _check(
        self.projector.in_dim == self.vision.width,
        f"projector in_dim {self.projector.in_dim} != vision width {self.vision.width}",
    )
    _check(
        self.projector.out_dim == self.llm.hidden_size,
        f"projector out_dim {self.projector.out_dim} != llm hidden {self.llm.hidden_size}",
    )
    from llava_jax.models import video  # the video rules live with the code that applies them

    video.check_config(self)
    if self.image_grid_pinpoints is None:
      _check(
          self.vision_aspect_ratio is None and self.max_tiles_per_image is None and self.max_image_tokens is None,
          "vision_aspect_ratio / max_tiles_per_image / max_image_tokens need image_grid_pinpoints (anyres)",
      )
      return
    from llava_jax.models import anyres  # the anyres rules live with the code that applies them

    # Lists (JSON, HF config.json) become tuples so the config stays hashable.
    object.__setattr__(self, "image_grid_pinpoints", anyres.check_config(self))

  @property
  def num_image_tokens(self) -> int:
    """Features per image: one tile's (LLaVA-1.5); anyres images vary, see ``models.anyres``."""
    return self.vision.num_features

  @property
  def anyres(self) -> bool:
    return self.image_grid_pinpoints is not None

  @property
  def tiles_per_image(self) -> int:
    """Anyres tile slots per image (base tile included): pixel_values' P axis."""
    from llava_jax.models import anyres

    return self.max_tiles_per_image or anyres.max_tiles(self)

  @property
  def image_token_budget(self) -> int:
    """Anyres image-token slots per image after packing: the layout's N axis."""
    from llava_jax.models import anyres

    return self.max_image_tokens or anyres.max_tokens(self)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    # Unset anyres and video fields are left out, so a LLaVA-1.5 config's dict (run.json,
    # the resume check) is what it was before they existed.
    for k in _OPTIONAL_FIELDS:
      if d[k] is None:
        del d[k]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
    llm = dict(d["llm"])
    if llm.get("rope_scaling") is not None:
      llm["rope_scaling"] = RopeScaling(**llm["rope_scaling"])
    rest = {k: v for k, v in d.items() if k not in ("vision", "projector", "llm")}
    return cls(
        vision=VisionConfig(**d["vision"]), projector=ProjectorConfig(**d["projector"]), llm=LLMConfig(**llm), **rest
    )


_OPTIONAL_FIELDS = (
    "image_grid_pinpoints",
    "vision_aspect_ratio",
    "max_tiles_per_image",
    "max_image_tokens",
    "video_token_id",
    "video_pooling",
    "video_pool_stride",
)

_CLIP = dict(
    kind="clip",
    act="quick_gelu",
    class_token=True,
    pre_norm=True,
    patch_bias=False,
    layer_norm_eps=1e-5,
    head=False,
    select_feature="patch",
)
_SIGLIP = dict(
    kind="siglip",
    act="gelu_tanh",
    class_token=False,
    pre_norm=False,
    patch_bias=True,
    layer_norm_eps=1e-6,
    head=True,
    select_feature="cls_patch",
)

VISION_VARIANTS: dict[str, VisionConfig] = {
    "clip-L/14-336": VisionConfig(
        **_CLIP, image_size=336, patch_size=14, width=1024, depth=24, mlp_dim=4096, num_heads=16
    ),
    "clip-L/14": VisionConfig(**_CLIP, image_size=224, patch_size=14, width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "siglip-So400m/14-384": VisionConfig(
        **_SIGLIP, image_size=384, patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16, select_layer=-1
    ),
    "siglip-B/16-224": VisionConfig(
        **_SIGLIP, image_size=224, patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12, select_layer=-1
    ),
    "clip-tiny": VisionConfig(**_CLIP, image_size=28, patch_size=7, width=64, depth=3, mlp_dim=128, num_heads=4),
    "siglip-tiny": VisionConfig(
        **_SIGLIP, image_size=28, patch_size=7, width=64, depth=3, mlp_dim=128, num_heads=4, select_layer=-1
    ),
}

LLM_VARIANTS: dict[str, LLMConfig] = {
    "vicuna-7b": LLMConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        rms_norm_eps=1e-5,
    ),
    "vicuna-13b": LLMConfig(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        rms_norm_eps=1e-5,
    ),
    "mistral-7b": LLMConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        sliding_window=4096,
        max_position_embeddings=32768,
    ),
    "qwen2-7b": LLMConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        qkv_bias=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    ),
    "qwen2-0.5b": LLMConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        qkv_bias=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        max_position_embeddings=32768,
    ),
    "gemma-2b": LLMConfig(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_layers=18,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
        act="gelu_tanh",
        tie_embeddings=True,
        embed_scale=True,
        norm_plus_one=True,
        rms_norm_eps=1e-6,
        max_position_embeddings=8192,
    ),
    "llama3-8b": LLMConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(),
        max_position_embeddings=131072,
    ),
    "tiny": LLMConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
    ),
}


def llava_config(
    vision: str | VisionConfig,
    llm: str | LLMConfig,
    *,
    projector: str = "mlp2x_gelu",
    image_token_id: int | None = None,
    **overrides: Any,
) -> LlavaConfig:
  """Builds a LlavaConfig from variant names, e.g. ``llava_config("clip-L/14-336", "vicuna-7b")``."""
  v = VISION_VARIANTS[vision] if isinstance(vision, str) else vision
  l = LLM_VARIANTS[llm] if isinstance(llm, str) else llm
  proj = ProjectorConfig(kind=projector, in_dim=v.width, out_dim=l.hidden_size)
  tok = l.vocab_size - 1 if image_token_id is None else image_token_id
  return LlavaConfig(vision=v, projector=proj, llm=l, image_token_id=tok, **overrides)
