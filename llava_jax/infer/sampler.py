"""Batched generation for LLaVA with a KV cache: greedy, temperature, top-k and top-p.

    tokens = generate(cfg, params, input_ids, pixel_values, attention_mask,
                      max_new_tokens=64, eos_token_id=tok.eos_id)      # int32[B, N]
    for step in generate_stream(cfg, params, ...):                      # int32[B] per token
      ...

How it runs. The prompt (image features merged by ``Llava.embed_inputs``) is prefilled
into a fixed-shape cache of S = P + N slots in one decoder pass; then one token per step
is decoded against the cache inside a jitted ``jax.lax.while_loop`` that exits as soon
as every row has emitted a stop token. Prompts are left-padded: all rows share the slot
layout, padding slots carry segment id 0 (never attended to), and RoPE positions count
valid tokens only (``cumsum(mask) - 1``), as HF ``generate`` does. After a stop token a
row emits ``cfg.pad_token_id``. Sampling keys are ``fold_in(rng, step)``, so a seed gives
the same tokens whether or not the loop exits early, streamed or not.

Any-resolution configs (LLaVA-NeXT, OneVision: ``cfg.anyres``) take tiles float32[I, P,
S, S, 3] (or [B, M, P, S, S, 3]) and ``image_sizes`` int[I, 2] (or an ``ImageLayout``,
``models.anyres``); each image then has its own placeholder count.

Video configs (OneVision, NeXT-Video: ``cfg.video_token_id``) also take
``pixel_values_videos`` float32[V, F, S, S, 3] (or [B, M, F, S, S, 3] with ``video_mask``),
merged at the video placeholders in the prefill (``Llava.merge_videos``).

Sharding. Pass ``mesh=`` (a ``llava_jax.sharding`` mesh) with params placed on it
(``sharding.param_shardings``, or ``infer.loading.load_model(..., mesh=)``): the cache and
activations follow the logical-axis annotations (batch over ``data``/``fsdp``, kv heads
over ``tensor``). The mesh may span several processes (``jax.distributed``): every
process then calls with the same host arrays (the full batch), which enter the jitted
functions as global arrays (``to_mesh``: rows split over the batch axes when they divide,
else replicated), and the generated tokens come back replicated, readable on every
process with ``np.asarray``.

What lives where. This module: sampling (``sample_logits``, the sampling arguments'
checks), the prefill and decode passes and the loops around them. ``infer.inputs``: the
prompt and media arguments' host-side checks (shapes, placeholder counts, anyres layouts,
videos) and their placement, as one ``PreparedInputs`` the jitted functions take
(``prepare_inputs``; ``to_mesh`` is re-exported here).

Einsum letters: B batch, P prompt length, N new tokens, S cache slots, L layers,
K kv heads, D head dim, E embed, V vocab.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.infer.inputs import PreparedInputs, ctx_key, key_to_mesh, prepare_inputs, to_mesh
from llava_jax.models.configs import LlavaConfig
from llava_jax.models.llava import Llava, default_positions
from llava_jax.models.layers import ACT_TOKENS, CACHE_AXES
from llava_jax.models.llm import init_cache

__all__ = ["generate", "generate_stream", "prefill", "decode_step", "sample_logits", "init_cache", "to_mesh"]


def sample_logits(logits, rng, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
  """Picks one token per row. logits float32[B, V] -> int32[B]; greedy if temperature == 0."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------- traced pieces


def _mesh_ctx(ctx):
  """Entered around the jitted calls, so tracing sees the mesh and the logical rules."""
  if ctx is None:
    return contextlib.nullcontext()
  from llava_jax import sharding

  return sharding.use_mesh(ctx[0], ctx[1])


def _constrain_cache(cache, ctx):
  """Shards the cache like activations (batch over data x fsdp, kv heads over tensor).

  The mesh is passed explicitly: under the legacy ``with mesh:`` context the modules'
  own logical constraints are no-ops in this flax version (they need ``jax.set_mesh``).
  """
  if ctx is None:
    return cache
  import flax.linen as nn
  from llava_jax import sharding

  axes = {"k": (None,) + CACHE_AXES, "v": (None,) + CACHE_AXES, "segment_ids": ACT_TOKENS}
  return {
      name: nn.with_logical_constraint(x, axes[name], rules=sharding.rules(ctx[1]), mesh=ctx[0])
      for name, x in cache.items()
  }


def _prefill(params, x: PreparedInputs, cache_len: int):
  """-> (last logits float32[B, V], cache, next positions int32[B])."""
  model = Llava(x.cfg)
  b = x.input_ids.shape[0]
  embeds = model.apply(
      {"params": params},
      x.input_ids,
      x.pixel_values,
      x.image_mask,
      image_layout=x.image_layout,
      method=Llava.embed_inputs,
  )
  if x.pixel_values_videos is not None:
    embeds = model.apply(
        {"params": params}, embeds, x.input_ids, x.pixel_values_videos, x.video_mask, method=Llava.merge_videos
    )
  positions = default_positions(x.input_ids, x.attention_mask)
  cache = _constrain_cache(init_cache(x.cfg.llm, b, cache_len), x.ctx)
  logits, cache = model.apply(
      {"params": params},
      embeds,
      positions,
      x.attention_mask,
      cache,
      method=lambda m, e, q, s, c: m.llm(e, q, s, c, last_only=True),
  )
  return logits[:, 0], _constrain_cache(cache, x.ctx), jnp.sum(x.attention_mask, axis=1).astype(jnp.int32)


def _decode(cfg: LlavaConfig, params, tokens, cache, cache_index, positions, ctx=None):
  """tokens int32[B] at slot ``cache_index`` -> (logits float32[B, V], cache)."""

  def run(m, t, c, i, q):
    return m.llm(m.llm.embed(t[:, None]), q[:, None], None, c, i, last_only=True)

  logits, cache = Llava(cfg).apply({"params": params}, tokens, cache, cache_index, positions, method=run)
  return logits[:, 0], _constrain_cache(cache, ctx)


def _replicated(x, ctx):
  """Outputs the host reads: replicated, so every process holds all of them."""
  if ctx is None:
    return x
  from llava_jax import sharding

  return jax.lax.with_sharding_constraint(x, sharding.replicated(ctx[0]))


def _stop(tokens, stop_ids: tuple[int, ...]):
  if not stop_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))


# ------------------------------------------------------------------- public API


def _sampling(temperature, rng, max_new_tokens, eos_token_id, stop_token_ids, mesh):
  """Checks the sampling arguments. -> (rng, stop ids): the key (``key(0)`` when greedy
  without one; replicated over ``mesh``, see ``inputs.key_to_mesh``) and the sorted ids of
  ``eos_token_id`` and ``stop_token_ids``."""
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an explicit rng key")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  stops = set(int(s) for s in (stop_token_ids or ()))
  if eos_token_id is not None:
    stops.add(int(eos_token_id))
  rng = jax.random.key(0) if rng is None else rng
  return (rng if mesh is None else key_to_mesh(rng, mesh)), tuple(sorted(stops))


def generate(
    cfg: LlavaConfig,
    params,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    rng=None,
    image_mask=None,
    stop_token_ids: Sequence[int] = (),
    mesh=None,
    rules=None,
    return_num_steps: bool = False,
    image_sizes=None,
    image_layout=None,
    pixel_values_videos=None,
    video_mask=None,
):
  """Generates up to ``max_new_tokens`` per prompt (prefill + jitted decode loop).

  Args:
    input_ids: int32[B, P], prompts left-padded (``attention_mask`` 0 on the left), with
      ``cfg.num_image_tokens`` image placeholders per image (anyres configs: image i's
      ``models.anyres.num_image_tokens(size_i, cfg)``).
    pixel_values: float32[I, S, S, 3] normalised NHWC (or [B, M, S, S, 3]), or None.
      Anyres configs: float32[I, P, S, S, 3] tiles (or [B, M, P, S, S, 3]), P =
      ``cfg.tiles_per_image`` (``data.anyres.preprocess_anyres`` + ``pad_tiles``).
    attention_mask: int[B, P] or None (no padding).
    temperature, top_k, top_p: sampling controls; greedy when temperature == 0.
    eos_token_id, stop_token_ids: a row stops after emitting any of them (the stop token
      is kept); later positions hold ``cfg.pad_token_id``. The loop ends early once every
      row has stopped.
    rng: PRNG key, required when sampling.
    image_mask: bool[I] (or [B, M]); False marks padding image slots.
    mesh, rules: optional ``llava_jax.sharding`` mesh (and logical-rule overrides) the
      params live on; the cache and activations are sharded by the logical axes. Host
      inputs become global arrays on it (``to_mesh``); with several processes each must
      pass the same values.
    return_num_steps: also return the int32 number of tokens generated per row before
      the loop ended (``max_new_tokens`` unless every row stopped earlier).
    image_sizes: anyres configs only: int[I, 2] (or [B, M, 2]) original (height, width)
      of each image slot (ignored where ``image_mask`` is False); the layout
      (``models.anyres.image_layout``) is built from them on the host.
    image_layout: anyres configs only, instead of ``image_sizes``: a precomputed
      ``models.anyres.ImageLayout`` of the I image slots.
    pixel_values_videos: video configs only (``cfg.video_token_id``): float32[V, F, S, S,
      3] normalised frames (or [B, M, F, S, S, 3]); ``input_ids`` then hold
      ``models.video.num_video_tokens(cfg, F)`` ids ``cfg.video_token_id`` per video.
    video_mask: bool[V] (or [B, M]); False marks padding video slots.
  Returns:
    int32[B, max_new_tokens] (and the step count with ``return_num_steps``); with a mesh,
    replicated over it (every process can read all rows).
  Raises:
    ValueError before compiling if the image placeholders in ``input_ids`` do not match
    the images given (``models.llava.check_image_tokens``; anyres:
    ``models.anyres.check_anyres_tokens``, row by row for [B, M] slots), or if an anyres
    image needs more tiles / tokens than the config's budget; the same for the video
    placeholders (``models.video.check_video_tokens``) and videos given to a config
    without ``video_token_id``.
  """
  x, rng, sampling = _start(
      cfg,
      input_ids,
      pixel_values,
      attention_mask,
      sampling=(temperature, top_k, top_p, rng, max_new_tokens, eos_token_id, stop_token_ids),
      image_mask=image_mask,
      image_sizes=image_sizes,
      image_layout=image_layout,
      pixel_values_videos=pixel_values_videos,
      video_mask=video_mask,
      mesh=mesh,
      rules=rules,
  )
  with _mesh_ctx(x.ctx):
    tokens, steps = _generate(params, x, rng, max_new_tokens=max_new_tokens, **sampling)
  return (tokens, steps) if return_num_steps else tokens


def _start(cfg, input_ids, pixel_values, attention_mask, *, sampling, mesh, **inputs):
  """What ``generate`` and ``generate_stream`` both begin with: the sampling arguments
  checked first (``_sampling``), then the inputs (``inputs.prepare_inputs``).

  ``sampling``: (temperature, top_k, top_p, rng, max_new_tokens, eos_token_id,
  stop_token_ids). Returns (PreparedInputs, rng, the jitted functions' static sampling
  keywords)."""
  temperature, top_k, top_p, rng, max_new_tokens, eos_token_id, stop_token_ids = sampling
  rng, stop_ids = _sampling(temperature, rng, max_new_tokens, eos_token_id, stop_token_ids, mesh)
  x = prepare_inputs(cfg, input_ids, pixel_values, attention_mask, mesh=mesh, **inputs)
  return x, rng, dict(temperature=float(temperature), top_k=top_k, top_p=top_p, stop_ids=stop_ids)


_SAMPLING_STATIC = ("temperature", "top_k", "top_p", "stop_ids")


@functools.partial(jax.jit, static_argnames=("max_new_tokens",) + _SAMPLING_STATIC)
def _generate(params, x: PreparedInputs, rng, *, max_new_tokens, temperature, top_k, top_p, stop_ids):
  cfg, ctx = x.cfg, x.ctx
  b, p = x.input_ids.shape
  n = max_new_tokens
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  logits, cache, positions = _prefill(params, x, p + n)
  first = sample(logits, jax.random.fold_in(rng, 0))
  tokens = jnp.full((b, n), cfg.pad_token_id, jnp.int32).at[:, 0].set(first)

  def cond(state):
    i, _, _, _, _, done = state
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, last, cache, positions, tokens, done = state
    logits, cache = _decode(cfg, params, last, cache, p + i - 1, positions, ctx)
    nxt = jnp.where(done, cfg.pad_token_id, sample(logits, jax.random.fold_in(rng, i)))
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, i, axis=1)
    return i + 1, nxt, cache, positions + 1, tokens, done | _stop(nxt, stop_ids)

  state = (jnp.int32(1), first, cache, positions, tokens, _stop(first, stop_ids))
  steps, _, _, _, tokens, _ = jax.lax.while_loop(cond, body, state)
  return _replicated(tokens, ctx), _replicated(steps, ctx)


def generate_stream(
    cfg: LlavaConfig,
    params,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    rng=None,
    image_mask=None,
    stop_token_ids: Sequence[int] = (),
    mesh=None,
    rules=None,
    image_sizes=None,
    image_layout=None,
    pixel_values_videos=None,
    video_mask=None,
) -> Iterator[np.ndarray]:
  """Like ``generate`` (same arguments, same tokens) but yields each step's tokens as soon as
  they exist: numpy int32[B] per step, at most ``max_new_tokens`` times, stopping after
  the step in which every row has emitted a stop token. A host loop over a jitted
  single-step function (the cache is donated), for interactive use."""
  x, rng, sampling = _start(
      cfg,
      input_ids,
      pixel_values,
      attention_mask,
      sampling=(temperature, top_k, top_p, rng, max_new_tokens, eos_token_id, stop_token_ids),
      image_mask=image_mask,
      image_sizes=image_sizes,
      image_layout=image_layout,
      pixel_values_videos=pixel_values_videos,
      video_mask=video_mask,
      mesh=mesh,
      rules=rules,
  )
  step = functools.partial(_stream_step, x.cfg, params, ctx=x.ctx, **sampling)
  p = x.input_ids.shape[1]
  with _mesh_ctx(x.ctx):
    tok, done, cache, positions = _stream_first(params, x, rng, cache_len=p + max_new_tokens, **sampling)
  for i in range(1, max_new_tokens + 1):
    host_tok, host_done = jax.device_get((tok, done))
    yield np.asarray(host_tok, np.int32)
    if i == max_new_tokens or bool(np.all(host_done)):
      return
    with _mesh_ctx(x.ctx):
      tok, done, cache, positions = step(tok, done, cache, positions, np.int32(p + i - 1), jax.random.fold_in(rng, i))


@functools.partial(jax.jit, static_argnames=("cache_len",) + _SAMPLING_STATIC)
def _stream_first(params, x: PreparedInputs, rng, *, cache_len, temperature, top_k, top_p, stop_ids):
  logits, cache, positions = _prefill(params, x, cache_len)
  tok = sample_logits(logits, jax.random.fold_in(rng, 0), temperature=temperature, top_k=top_k, top_p=top_p)
  return _replicated(tok, x.ctx), _replicated(_stop(tok, stop_ids), x.ctx), cache, positions


@functools.partial(jax.jit, static_argnums=0, static_argnames=_SAMPLING_STATIC + ("ctx",), donate_argnames=("cache",))
def _stream_step(
    cfg, params, last, done, cache, positions, cache_index, key, *, temperature, top_k, top_p, stop_ids, ctx
):
  logits, cache = _decode(cfg, params, last, cache, cache_index, positions, ctx)
  nxt = sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
  nxt = _replicated(jnp.where(done, cfg.pad_token_id, nxt), ctx)
  return nxt, _replicated(done | _stop(nxt, stop_ids), ctx), cache, positions + 1


# ------------------------------------------------------------ building blocks


def prefill(
    cfg: LlavaConfig,
    params,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    image_mask=None,
    *,
    cache_len: int,
    mesh=None,
    rules=None,
    image_sizes=None,
    image_layout=None,
    pixel_values_videos=None,
    video_mask=None,
):
  """Runs the prompt into a fresh cache of ``cache_len`` slots (>= P).

  Args: as ``generate`` (``image_sizes`` / ``image_layout`` for anyres configs,
    ``pixel_values_videos`` / ``video_mask`` for video configs);
    attention_mask int[B, P] (None: no padding).
  Returns:
    logits float32[B, V] at the last prompt position, the cache
    (``{"k", "v": [L, B, cache_len, K, D], "segment_ids": int32[B, cache_len]}``) and
    int32[B], the position of each row's next token.
  """
  if cache_len < np.shape(input_ids)[1]:
    raise ValueError(f"cache_len {cache_len} is shorter than the prompt ({np.shape(input_ids)[1]})")
  x = prepare_inputs(
      cfg,
      input_ids,
      pixel_values,
      attention_mask,
      image_mask=image_mask,
      image_sizes=image_sizes,
      image_layout=image_layout,
      pixel_values_videos=pixel_values_videos,
      video_mask=video_mask,
      mesh=mesh,
      rules=rules,
  )
  with _mesh_ctx(x.ctx):
    return _prefill_jit(params, x, cache_len=cache_len)


def decode_step(cfg: LlavaConfig, params, tokens, cache, cache_index, positions, *, mesh=None, rules=None):
  """One token per row into the cache (the cache passed in is not donated).

  Args: tokens int32[B]; cache from ``prefill``/``decode_step``; cache_index int32 scalar,
    the slot the tokens go to (P + step); positions int32[B] their RoPE positions.
  Returns: (logits float32[B, V] for the next token, the updated cache).
  """
  ctx = ctx_key(mesh, rules)
  if mesh is None:
    tokens, positions = jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)
  else:
    tokens = to_mesh(np.asarray(tokens, np.int32), mesh, rules)
    positions = to_mesh(np.asarray(positions, np.int32), mesh, rules)
  with _mesh_ctx(ctx):
    return _decode_jit(cfg, params, tokens, cache, np.int32(cache_index), positions, ctx=ctx)


@functools.partial(jax.jit, static_argnames=("cache_len",))
def _prefill_jit(params, x: PreparedInputs, *, cache_len):
  return _prefill(params, x, cache_len)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("ctx",))
def _decode_jit(cfg, params, tokens, cache, cache_index, positions, *, ctx):
  return _decode(cfg, params, tokens, cache, cache_index, positions, ctx)
