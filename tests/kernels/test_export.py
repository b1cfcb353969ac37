"""The compiled (interpret=False) flash kernels lower for TPU (Mosaic) and CUDA (Triton).

Export from this CPU host only runs the Pallas lowering to Mosaic / Triton IR; the final
compilation happens on the device. Triton custom calls carry no serialization
compatibility guarantee, so the CUDA export must opt out of that check explicitly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from llava_jax.kernels.attention import attention

B, T, H, K, D = 2, 4096, 32, 8, 128
TARGETS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
FEATURES = {
    "causal": dict(causal=True),
    "all_masks": dict(causal=True, logits_soft_cap=30.0, sliding_window=1024, segments=True, prefix=True),
}


def _specs():
  sds = jax.ShapeDtypeStruct
  return (
      sds((B, T, H, D), jnp.bfloat16),
      sds((B, T, K, D), jnp.bfloat16),
      sds((B, T, K, D), jnp.bfloat16),
      sds((B, T), jnp.int32),
      sds((B,), jnp.int32),
  )


def _attention_fn(features):
  features = dict(features)
  segments, prefix = features.pop("segments", False), features.pop("prefix", False)

  def fn(q, k, v, segment_ids, prefix_len):
    return attention(
        q,
        k,
        v,
        impl="pallas",
        interpret=False,
        segment_ids=segment_ids if segments else None,
        prefix_len=prefix_len if prefix else None,
        **features,
    )

  return fn


def _export(fn, platform):
  checks = [export.DisabledSafetyCheck.custom_call(TARGETS["cuda"])] if platform == "cuda" else []
  return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*_specs())


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("platform", TARGETS)
def test_forward_lowers(platform, features):
  exported = _export(_attention_fn(FEATURES[features]), platform)
  text = exported.mlir_module()
  assert text.count(TARGETS[platform]) == 1  # one forward kernel, nothing else
  assert exported.out_avals[0].shape == (B, T, H, D)
  assert exported.out_avals[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("platform", TARGETS)
def test_backward_lowers(platform, features):
  attn = _attention_fn(FEATURES[features])

  def grads(q, k, v, segment_ids, prefix_len):
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, segment_ids, prefix_len), q, k, v)
    return vjp(out)

  exported = _export(grads, platform)
  # forward (for the residuals), dq and dk/dv kernels.
  assert exported.mlir_module().count(TARGETS[platform]) == 3
  assert [a.shape for a in exported.out_avals] == [(B, T, H, D), (B, T, K, D), (B, T, K, D)]
