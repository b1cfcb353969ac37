"""Analytic model FLOPs per train step (the MFU numerator, PaLM/MaxText convention).

Counted from the config rather than from XLA's ``cost_analysis``, which counts a
``scan`` body once instead of once per layer (it under-reports a scanned 12-layer model
about 12x). Conventions: a multiply-add is 2 FLOPs; a group whose weights train costs
3x its forward (forward, input gradients, weight gradients), a frozen group that
gradients must flow through costs 2x, a frozen group with nothing trainable before it
costs 1x; remat recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from llava_jax.models.configs import LLMConfig, LlavaConfig, VisionConfig


def llm_forward_flops_per_token(c: LLMConfig, context: int) -> float:
  """Forward FLOPs for one token attending to ``context`` positions (causal average ~T/2)."""
  d = c.dim_per_head
  proj = c.hidden_size * d * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o and k, v
  mlp = 3 * c.hidden_size * c.intermediate_size
  attn = 2 * c.num_heads * d * context  # QK^T and PV
  return c.num_layers * (2 * (proj + mlp) + 2 * attn) + 2 * c.hidden_size * c.vocab_size


def vit_forward_flops_per_image(c: VisionConfig) -> float:
  n = c.num_patches + int(c.class_token)
  per_token = 2 * (4 * c.width * c.width + 2 * c.width * c.mlp_dim) + 2 * 2 * c.width * n
  patch = 2 * (c.patch_size**2 * 3) * c.width * c.num_patches
  return c.num_layers_used * per_token * n + patch


def train_step_flops(
    cfg: LlavaConfig, *, tokens: int, seq_len: int, images: int, train_img: bool, train_projector: bool, train_llm: bool
) -> float:
  """Model FLOPs of one optimizer step over ``tokens`` (B*T) tokens and ``images`` images."""
  llm_mult = 3 if train_llm else 2  # gradients always flow through the LLM (to its inputs)
  proj_mult = 3 if train_projector else (2 if train_img else 1)
  img_mult = 3 if train_img else 1
  n_feat = cfg.num_image_tokens
  p = cfg.projector
  proj = (
      0
      if p.kind == "identity"
      else 2 * n_feat * (p.in_dim * p.out_dim + (p.out_dim * p.out_dim if p.kind == "mlp2x_gelu" else 0))
  )
  flops = llm_mult * tokens * llm_forward_flops_per_token(cfg.llm, max(seq_len // 2, 1))
  flops += images * (proj_mult * proj + img_mult * vit_forward_flops_per_image(cfg.vision))
  return float(flops)
