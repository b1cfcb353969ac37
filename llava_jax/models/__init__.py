"""Public model API: configs, variants and the Flax modules."""

from llava_jax.models.configs import (
    LLM_VARIANTS,
    VISION_VARIANTS,
    LLMConfig,
    LlavaConfig,
    ProjectorConfig,
    RopeScaling,
    VisionConfig,
    llava_config,
)
from llava_jax.models.llava import Llava, check_image_tokens, init_params, merge_image_features
from llava_jax.models.llm import Decoder
from llava_jax.models.projector import Projector
from llava_jax.models.vit import VisionTransformer

__all__ = [
    "LLM_VARIANTS",
    "VISION_VARIANTS",
    "LLMConfig",
    "LlavaConfig",
    "ProjectorConfig",
    "RopeScaling",
    "VisionConfig",
    "llava_config",
    "Llava",
    "check_image_tokens",
    "init_params",
    "merge_image_features",
    "Decoder",
    "Projector",
    "VisionTransformer",
]
