"""The whole LLaVA model with ``attn_impl="pallas"`` (interpret mode on CPU) gives the same
logits and gradients as ``"xla"``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models import LLM_VARIANTS, VISION_VARIANTS, Llava, init_params, llava_config


def _cfg(impl):
  vision = dataclasses.replace(VISION_VARIANTS["clip-tiny"], attn_impl=impl)
  llm = dataclasses.replace(LLM_VARIANTS["tiny"], attn_impl=impl, num_layers=1)
  return llava_config(vision, llm)


def test_pallas_model_matches_xla_logits_and_grads():
  cfg_x, cfg_p = _cfg("xla"), _cfg("pallas")
  params = init_params(cfg_x, jax.random.key(0))
  n = cfg_x.num_image_tokens
  ids = np.array(
      [[1, 4] + [cfg_x.image_token_id] * n + [5, 6, 7, 0, 0, 0, 0, 0], [1, 8, 9, 10, 11, 12, 13, 14] + [0] * (n + 2)],
      np.int32,
  )
  mask = (np.arange(ids.shape[1]) < np.array([[n + 5], [8]])).astype(np.int32)
  px = np.random.default_rng(0).normal(size=(1, 28, 28, 3)).astype(np.float32)
  targets = np.roll(ids, -1, axis=1) % cfg_x.llm.vocab_size

  def loss(p, cfg):
    logits = Llava(cfg).apply({"params": p}, ids, px, mask)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / mask.sum(), logits

  (lx, logits_x), gx = jax.value_and_grad(loss, has_aux=True)(params, cfg_x)
  (lp, logits_p), gp = jax.value_and_grad(loss, has_aux=True)(params, cfg_p)
  valid = mask.astype(bool)
  assert np.abs(np.asarray(logits_p)[valid] - np.asarray(logits_x)[valid]).max() < 1e-4
  global_scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(gx))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gx)[0], jax.tree.leaves(gp)):
    name = jax.tree_util.keystr(path)
    if "k_proj']['bias" in name:
      # A key bias adds the same q.b to every logit of a row: softmax is invariant to it,
      # so its true gradient is 0 and both implementations must give (numerically) 0.
      assert float(jnp.abs(a).max()) < 1e-6 * global_scale and float(jnp.abs(b).max()) < 1e-6 * global_scale
      continue
    scale = float(jnp.abs(a).max())
    assert float(jnp.abs(a - b).max()) <= 1e-4 * scale, name


def test_pallas_runs_per_shard_on_a_mesh():
  """Under a 2x2x2 mesh the kernel runs per (batch, head) shard via shard_map and matches XLA."""
  from llava_jax import sharding
  from llava_jax.kernels.attention import attention

  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(4, 40, 4, 64)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(4, 40, 2, 64)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(4, 40, 2, 64)), jnp.float32)
  seg = jnp.asarray((np.arange(40)[None] < np.array([[40], [31], [17], [40]])).astype(np.int32))
  ref = attention(q, k, v, segment_ids=seg, impl="xla")
  mesh = sharding.make_mesh((2, 2, 2))
  with sharding.use_mesh(mesh):
    fn = jax.jit(lambda q, k, v, s: attention(q, k, v, segment_ids=s, impl="pallas"))
    lowered = fn.lower(q, k, v, seg).as_text()
    out = fn(q, k, v, seg)
  assert "sdy.manual_computation" in lowered  # the kernel runs inside shard_map, per shard
  valid = np.asarray(seg).astype(bool)
  assert np.abs(np.asarray(out) - np.asarray(ref))[valid].max() < 1e-5
