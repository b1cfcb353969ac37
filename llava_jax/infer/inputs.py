"""``sampler.generate``'s model inputs: checked on the host before anything is compiled, then
placed as the jitted functions take them (``PreparedInputs``, built by ``prepare_inputs``).

Checks (``check_inputs`` runs them all): the prompt's shapes (``input_ids`` int[B, P], a
matching ``attention_mask``), the anyres ``ImageLayout`` (``anyres_layout``), the videos'
shapes (``check_video_inputs``), then image placeholders against the images (LLaVA-1.5
counts, or each anyres image's packed count from its ``ImageLayout``) and video
placeholders against ``pixel_values_videos`` (``models.video.num_video_tokens(cfg, F)``
per real video, row by row for [B, M] slots): ``check_placeholders``. The sampling
arguments (temperature, rng, ``max_new_tokens``, stop ids) are the sampler's own.

Placement: without a mesh, device arrays; with one, global arrays on it (``to_mesh``,
``key_to_mesh``), each process placing only its own devices' rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models import anyres, video
from llava_jax.models.configs import LlavaConfig


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=(
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_mask",
        "image_layout",
        "pixel_values_videos",
        "video_mask",
    ),
    meta_fields=("cfg", "ctx"),
)
@dataclasses.dataclass(frozen=True)
class PreparedInputs:
  """A prompt and its media, checked, as the sampler's jitted functions take them.

  A pytree: the arrays are its leaves (device arrays, or global arrays on the mesh); ``cfg``
  and ``ctx`` are static, part of the jitted functions' cache key.
  """

  cfg: LlavaConfig  # without the in-jit placeholder check once checked here
  input_ids: jax.Array  # int32[B, P]
  attention_mask: jax.Array  # int32[B, P]; ones when none was given
  pixel_values: jax.Array | None
  image_mask: jax.Array | None
  image_layout: anyres.ImageLayout | None  # anyres configs (``anyres_layout``), else None
  pixel_values_videos: jax.Array | None
  video_mask: jax.Array | None
  ctx: tuple | None  # ``ctx_key(mesh, rules)``


def prepare_inputs(
    cfg: LlavaConfig,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    *,
    image_mask=None,
    image_sizes=None,
    image_layout=None,
    pixel_values_videos=None,
    video_mask=None,
    mesh=None,
    rules=None,
) -> PreparedInputs:
  """``generate``'s prompt and media arguments (same names), checked (``check_inputs``);
  with a mesh, as global arrays on it (see ``to_mesh``)."""
  cfg, layout = check_inputs(
      cfg,
      input_ids,
      pixel_values,
      attention_mask,
      image_mask,
      image_layout,
      image_sizes,
      pixel_values_videos,
      video_mask,
  )
  if mesh is None:
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  else:
    as_int32 = lambda x: x if isinstance(x, jax.Array) else np.asarray(x, np.int32)
    ids = to_mesh(as_int32(input_ids), mesh, rules)
    mask = to_mesh(np.ones(ids.shape, np.int32) if attention_mask is None else as_int32(attention_mask), mesh, rules)
    pixel_values, image_mask = to_mesh(pixel_values, mesh, rules), to_mesh(image_mask, mesh, rules)
    if layout is not None:  # [I, ...] rows, like the images: split over the batch axes when they divide
      layout = anyres.ImageLayout(*(to_mesh(x, mesh, rules) for x in layout))
    pixel_values_videos, video_mask = to_mesh(pixel_values_videos, mesh, rules), to_mesh(video_mask, mesh, rules)
  return PreparedInputs(
      cfg=cfg,
      input_ids=ids,
      attention_mask=mask,
      pixel_values=pixel_values,
      image_mask=image_mask,
      image_layout=layout,
      pixel_values_videos=pixel_values_videos,
      video_mask=video_mask,
      ctx=ctx_key(mesh, rules),
  )


def ctx_key(mesh, rules):
  """Hashable (mesh, rule overrides), a static jit argument so each mesh traces its own."""
  return None if mesh is None else (mesh, tuple(tuple(r) for r in (rules or ())))


def to_mesh(x, mesh, rules=None):
  """A host array (the same on every process) -> a global ``jax.Array`` on ``mesh``.

  Dim 0 is split over the mesh's batch axes (``sharding.batch_sharding``) when it divides
  them, else the array is replicated. Built with ``jax.make_array_from_callback``, so each
  process places only its own devices' rows: no numpy array reaches a jit with a global
  sharding. An array already on all of ``mesh``'s devices is returned as it is; None too.
  """
  from llava_jax import sharding

  if x is None:
    return None
  if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
    return x
  host = np.asarray(x)
  split = host.ndim > 0 and host.shape[0] % sharding.batch_shards(mesh, rules) == 0
  target = sharding.batch_sharding(mesh, host.ndim, rules) if split else sharding.replicated(mesh)
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def key_to_mesh(rng, mesh):
  """A PRNG key (new-style or raw uint32) replicated over ``mesh``."""
  from llava_jax import sharding

  if isinstance(rng, jax.Array) and rng.sharding.device_set == set(mesh.devices.flat):
    return rng
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  host = np.asarray(jax.random.key_data(rng) if typed else rng)
  data = jax.make_array_from_callback(host.shape, sharding.replicated(mesh), lambda index: host[index])
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(rng)) if typed else data


# ------------------------------------------------------------------- checks


def check_inputs(
    cfg: LlavaConfig,
    input_ids,
    pixel_values,
    attention_mask,
    image_mask,
    image_layout=None,
    image_sizes=None,
    pixel_values_videos=None,
    video_mask=None,
) -> tuple[LlavaConfig, anyres.ImageLayout | None]:
  """Every check of the prompt and its media, on the host. Returns ``cfg`` (without the
  in-jit placeholder check once checked here, see ``check_placeholders``) and the anyres
  ``ImageLayout`` of the images (``anyres_layout``; None for LLaVA-1.5 configs)."""
  if np.ndim(input_ids) != 2:
    raise ValueError(f"input_ids must be int32[B, P], got shape {np.shape(input_ids)}")
  if attention_mask is not None and np.shape(attention_mask) != np.shape(input_ids):
    raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {np.shape(input_ids)}")
  layout = anyres_layout(cfg, input_ids, pixel_values, image_mask, image_layout, image_sizes)
  check_video_inputs(cfg, input_ids, pixel_values_videos, video_mask)
  cfg = check_placeholders(cfg, input_ids, pixel_values, image_mask, layout, pixel_values_videos, video_mask)
  return cfg, layout


def square_slots(cfg: LlavaConfig, input_ids, pixel_values, image_mask):
  """Which image slots take OneVision's multi-image mode (``models.anyres.square_images``):
  those of rows holding several images. [B, M, ...] pixel_values: per row, from
  ``image_mask``; [I, ...]: one row holds all I, several rows one image each (anything
  else needs the [B, M, ...] form, which says which row an image is in)."""
  if anyres.max_patches(cfg) is None:
    return None
  if np.ndim(pixel_values) == 6:
    b, m = np.shape(pixel_values)[:2]
    mask = np.ones((b, m), bool) if image_mask is None else np.asarray(image_mask, bool).reshape(b, m)
    return anyres.square_flags(cfg, mask)
  rows, images = np.shape(input_ids)[0], np.shape(pixel_values)[0]
  if rows == 1:
    return np.full(images, anyres.square_images(cfg, images))
  if images > rows:
    raise ValueError(
        f"{images} images for {rows} rows in a flat [I, P, S, S, 3] pixel_values: a OneVision config packs a row of "
        "several images differently from a row of one, so pass them as [B, M, P, S, S, 3] with image_mask"
    )
  return None


def anyres_layout(cfg: LlavaConfig, input_ids, pixel_values, image_mask, image_layout, image_sizes):
  """The ``ImageLayout`` of an anyres prompt's images (built from ``image_sizes`` on the
  host when not given); None for LLaVA-1.5 configs, which take neither."""
  if not cfg.anyres:
    if image_layout is not None or image_sizes is not None:
      raise ValueError(
          "image_layout / image_sizes are for anyres configs (image_grid_pinpoints set: LLaVA-NeXT, OneVision); "
          "this config has none"
      )
    return None
  if image_layout is not None and image_sizes is not None:
    raise ValueError("pass image_layout or image_sizes, not both")
  if pixel_values is None:
    if image_layout is not None or image_sizes is not None:
      raise ValueError("image_layout / image_sizes given without pixel_values")
    return None
  if np.ndim(pixel_values) not in (5, 6):
    raise ValueError(
        f"anyres pixel_values must be float32[I, P, S, S, 3] or [B, M, P, S, S, 3] tiles "
        f"(data.anyres.preprocess_anyres + pad_tiles), got shape {np.shape(pixel_values)}"
    )
  if np.ndim(pixel_values) == 6 and np.shape(pixel_values)[0] != np.shape(input_ids)[0]:
    raise ValueError(
        f"pixel_values {np.shape(pixel_values)} has {np.shape(pixel_values)[0]} rows of image slots but input_ids "
        f"has {np.shape(input_ids)[0]} rows"
    )
  if image_layout is None:
    if image_sizes is None:
      raise ValueError(
          "an anyres config needs the images' original sizes: pass image_sizes int[I, 2] (or [B, M, 2]) "
          "(height, width), as data.anyres.preprocess_anyres returns them, or image_layout"
      )
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    real = np.ones(len(sizes), bool) if image_mask is None else np.asarray(image_mask, bool).reshape(-1)
    if len(real) == len(sizes) and np.any(sizes[real] < 1):
      raise ValueError(
          f"image_sizes must be positive (height, width) wherever image_mask marks a real image, got {sizes.tolist()}"
      )
    image_layout = anyres.image_layout(
        image_sizes, cfg, image_mask, square_slots(cfg, input_ids, pixel_values, image_mask)
    )
  slots = int(np.prod(np.shape(pixel_values)[:-4]))
  if np.shape(image_layout.num_tokens)[0] != slots:
    raise ValueError(
        f"the image layout is for {np.shape(image_layout.num_tokens)[0]} images but pixel_values "
        f"{np.shape(pixel_values)} holds {slots} image slots"
    )
  return image_layout


def check_placeholders(
    cfg: LlavaConfig, ids, pixel_values, image_mask, image_layout=None, pixel_values_videos=None, video_mask=None
) -> LlavaConfig:
  """The placeholder/image count check on the host, before anything is compiled (inside
  jit it is a device callback, whose error arrives late, wrapped, and which on a mesh
  gathers the counts to one device on every call). Returns ``cfg`` without the in-jit
  check once checked here; inputs that are global arrays not all on this process keep it.
  Anyres configs: each image's count is ``image_layout.num_tokens`` (checked per row
  when the images come as [B, M] slots). Video configs: ``check_video_placeholders``."""
  from llava_jax.models.llava import check_image_tokens

  local = lambda x: not (isinstance(x, jax.Array) and not x.is_fully_addressable)
  counts = None if image_layout is None else image_layout.num_tokens
  if not (local(ids) and local(image_mask) and local(counts) and local(video_mask)):
    return cfg
  check_video_placeholders(cfg, ids, pixel_values_videos, video_mask)
  per_row = np.sum(np.asarray(ids) == cfg.image_token_id, axis=1)
  if cfg.anyres:
    counts = np.zeros(0, np.int32) if counts is None else np.asarray(counts).reshape(-1)
    if image_mask is not None and counts.size:
      counts = np.where(np.asarray(image_mask, bool).reshape(-1), counts, 0)
    per_slot = np.shape(pixel_values)[1] if pixel_values is not None and np.ndim(pixel_values) == 6 else None
    anyres.check_anyres_tokens(per_row, counts, per_slot)
  else:
    if image_mask is not None:
      num_images = int(np.sum(np.asarray(image_mask)))
    elif pixel_values is None:
      num_images = 0
    else:
      shape = np.shape(pixel_values)
      num_images = int(np.prod(shape[:2])) if len(shape) == 5 else shape[0]
    check_image_tokens(per_row, num_images, cfg.num_image_tokens)
  return dataclasses.replace(cfg, check_image_tokens=False) if cfg.check_image_tokens else cfg


def check_video_inputs(cfg: LlavaConfig, input_ids, pixel_values_videos, video_mask) -> None:
  """Shapes of ``pixel_values_videos`` (float32[V, F, S, S, 3] or [B, M, F, S, S, 3]) and
  ``video_mask`` (bool[V] or [B, M]); refuses videos for a config without ``video_token_id``."""
  if pixel_values_videos is None:
    if video_mask is not None:
      raise ValueError("video_mask given without pixel_values_videos")
    return
  if cfg.video_token_id is None:
    raise ValueError(
        "pixel_values_videos given, but this config has no video_token_id (a LLaVA-1.5 / interleave-style "
        "model): give the frames as images instead (LoadedModel.encode_prompt(..., video_frames=) turns each "
        "<video> into one <image> per frame for such a model)"
    )
  shape = np.shape(pixel_values_videos)
  if len(shape) not in (5, 6) or shape[-1] != 3:
    raise ValueError(
        f"pixel_values_videos must be float32[V, F, S, S, 3] or [B, M, F, S, S, 3] (frames per video F), "
        f"got shape {shape}"
    )
  if len(shape) == 6 and shape[0] != np.shape(input_ids)[0]:
    raise ValueError(
        f"pixel_values_videos {shape} has {shape[0]} rows of video slots but input_ids has "
        f"{np.shape(input_ids)[0]} rows"
    )
  if video_mask is not None and tuple(np.shape(video_mask)) != tuple(shape[: len(shape) - 4]):
    raise ValueError(f"video_mask shape {np.shape(video_mask)} does not match pixel_values_videos {shape} slots")


def check_video_placeholders(cfg: LlavaConfig, ids, pixel_values_videos, video_mask) -> None:
  """Each row's ``cfg.video_token_id`` count against its videos (``models.video``), on the host."""
  if cfg.video_token_id is None:
    return
  per_row = np.sum(np.asarray(ids) == cfg.video_token_id, axis=1)
  if pixel_values_videos is None:
    video.check_video_tokens(per_row, 0, None, 0)
    return
  shape = np.shape(pixel_values_videos)
  frames = shape[-4]
  tokens = video.num_video_tokens(cfg, frames)
  slots = int(np.prod(shape[: len(shape) - 4]))
  real = np.ones(slots, bool) if video_mask is None else np.asarray(video_mask, bool).reshape(-1)
  if len(shape) == 6:  # [B, M] slots: row b's placeholders are for row b's videos
    for b, n in enumerate(real.reshape(shape[0], shape[1]).sum(axis=1)):
      if per_row[b] != n * tokens:
        raise ValueError(
            f"sample {b} of the batch has {int(per_row[b])} video placeholder tokens but its videos need "
            f"{int(n)} x {tokens} = {int(n) * tokens} ({frames} frames each)"
        )
  video.check_video_tokens(per_row, int(real.sum()), frames, tokens)
