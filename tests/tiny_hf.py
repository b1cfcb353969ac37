"""Tiny randomly initialised Hugging Face models (PyTorch) to prove parity against.

Every model is built from a config (never fetched from a hub), saved with
``save_pretrained`` and then loaded through the same converter a user would call.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf

torch.manual_seed(0)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1):
  """Random values in *every* tensor: HF inits norms to 1 and biases to 0, which would let
  a swapped bias or a (1 + w) bug pass unnoticed. Matrices get std ``scale`` (HF's own
  init is 0.02) so activations stay O(1), where float32 noise is ~1e-6 and the
  1e-5 / 1e-4 tolerances have meaning."""
  g = torch.Generator().manual_seed(seed)
  # Gemma's RMSNorm applies (1 + w): its weights are centred on 0, every other norm's on 1.
  gemma_norms = {
      f"{m_name}.weight" if m_name else "weight"
      for m_name, m in model.named_modules()
      if type(m).__name__ == "GemmaRMSNorm"
  }
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = scale * torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight") and name not in gemma_norms:
        p.copy_(1.0 + noise)
      else:
        p.copy_(noise)
  return model.eval()


def clip_vision_config(**kw):
  return tf.CLIPVisionConfig(
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=3,
      num_attention_heads=4,
      image_size=28,
      patch_size=7,
      **kw,
  )


def siglip_vision_config(**kw):
  return tf.SiglipVisionConfig(
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=3,
      num_attention_heads=4,
      image_size=28,
      patch_size=7,
      **kw,
  )


def text_config(family: str, **kw):
  base = dict(
      vocab_size=128,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      pad_token_id=0,
      bos_token_id=1,
      eos_token_id=2,
  )
  if family == "llama":
    return tf.LlamaConfig(**{**base, **kw})
  if family == "llama3":
    return tf.LlamaConfig(
        **{
            **base,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            **kw,
        }
    )
  if family == "mistral":
    return tf.MistralConfig(**{**base, "sliding_window": 4096, **kw})
  if family == "qwen2":
    return tf.Qwen2Config(**{**base, "tie_word_embeddings": True, **kw})
  if family == "gemma":
    return tf.GemmaConfig(**{**base, "head_dim": 32, "hidden_activation": "gelu_pytorch_tanh", **kw})
  raise ValueError(family)


CAUSAL_LM = {
    "llama": tf.LlamaForCausalLM,
    "llama3": tf.LlamaForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "gemma": tf.GemmaForCausalLM,
}


def causal_lm(family: str, seed: int = 0, **kw):
  cfg = text_config(family, **kw)
  return randomize_(CAUSAL_LM[family](cfg), seed)


def llava(vision: str, family: str, seed: int = 0, image_token_index: int = 127, **kw):
  vc = clip_vision_config() if vision == "clip" else siglip_vision_config()
  cfg = tf.LlavaConfig(
      vision_config=vc,
      text_config=text_config(family),
      image_token_index=image_token_index,
      vision_feature_select_strategy="default" if vision == "clip" else "full",
      vision_feature_layer=-2 if vision == "clip" else -1,
      **kw,
  )
  return randomize_(tf.LlavaForConditionalGeneration(cfg), seed)


def random_pixels(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
  """float32[n, size, size, 3] NHWC, normalised-looking values."""
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def to_torch_pixels(px: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2)))
