"""LLaVA: ViT -> projector -> features merged at image placeholders -> decoder LLM.

Param tree: ``{"img": …, "projector": …, "llm": …}`` (as PaliGemma), so regexes such as
``img/.*`` freeze, shard and set learning rates.

Einsum letters: B batch, T text length, I images in the batch, N image tokens per
image, E LLM embed, V vocab.

Any-resolution configs (``cfg.image_grid_pinpoints`` set: LLaVA-NeXT, OneVision) take
tiled images and an ``image_layout``, and add the ``image_newline`` parameter at the top
of the tree; the contract is in ``llava_jax.models.anyres``. Video configs
(``cfg.video_token_id`` set: OneVision, NeXT-Video) also take ``pixel_values_videos``,
frames pooled per ``llava_jax.models.video``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models import anyres, video
from llava_jax.models.configs import LlavaConfig
from llava_jax.models.layers import logical
from llava_jax.models.llm import Decoder
from llava_jax.models.projector import Projector
from llava_jax.models.vit import VisionTransformer


def check_image_tokens(placeholders_per_row, num_images: int, tokens_per_image: int):
  """Raises ValueError if the placeholder counts cannot hold the given images exactly.

  Args:
    placeholders_per_row: int[B], image placeholder tokens in each sample.
    num_images: real images in ``pixel_values`` (all samples, in order).
    tokens_per_image: image features per image (``cfg.num_image_tokens``).
  """
  counts = np.asarray(placeholders_per_row).reshape(-1)
  num_images = int(num_images)
  expected = num_images * tokens_per_image
  bad_rows = [(i, int(n)) for i, n in enumerate(counts) if n % tokens_per_image]
  if bad_rows:
    i, n = bad_rows[0]
    raise ValueError(
        f"sample {i} of the batch has {n} image placeholder tokens, not a multiple of the "
        f"{tokens_per_image} features per image (rows with a remainder: {bad_rows})"
    )
  if int(counts.sum()) != expected:
    raise ValueError(
        f"image placeholder/feature count mismatch: the batch has {int(counts.sum())} image "
        f"placeholder tokens (per sample {counts.tolist()}) but {num_images} images x "
        f"{tokens_per_image} features = {expected} image features"
    )


def merge_image_features(
    text_embeds, input_ids, image_features, image_token_id: int, image_mask=None, feature_mask=None
):
  """Writes image features, in order, into the placeholder positions.

  Args:
    text_embeds: float[B, T, E]; input_ids: int32[B, T];
    image_features: float[I, N, E] in the order images appear in the batch (row-major).
    image_mask: bool[I] or None; False marks padding image slots (fixed-shape batches
      with text-only samples), which are skipped.
    feature_mask: bool[I, N] or None; False marks padding features (anyres images,
      each with its own count), which are skipped.
  Returns:
    float[B, T, E]. Counts must already match (see ``check_image_tokens``).
  """
  b, t, e = text_embeds.shape
  if image_mask is not None:  # stable: valid images first, in their original order
    image_features = image_features[jnp.argsort(~image_mask, stable=True)]
  is_image = (input_ids == image_token_id).reshape(-1)
  flat = image_features.reshape(-1, e).astype(text_embeds.dtype)
  if feature_mask is not None:  # valid features first, in order
    flat = flat[jnp.argsort(~feature_mask.reshape(-1), stable=True)]
  idx = jnp.clip(jnp.cumsum(is_image) - 1, 0, flat.shape[0] - 1)
  merged = jnp.where(is_image[:, None], flat[idx], text_embeds.reshape(-1, e))
  return merged.reshape(b, t, e)


def text_ids(input_ids, cfg: LlavaConfig):
  """int32[B, T] with image and video placeholders set to 0: they may lie outside the
  vocabulary, and their embeddings are overwritten anyway."""
  is_placeholder = input_ids == cfg.image_token_id
  if cfg.video_token_id is not None:
    is_placeholder = is_placeholder | (input_ids == cfg.video_token_id)
  return jnp.where(is_placeholder, 0, input_ids)


def default_positions(input_ids, attention_mask):
  """int32[B, T]: 0, 1, … over the valid (mask == 1) tokens; left padding stays at 0."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class Llava(nn.Module):
  cfg: LlavaConfig

  def setup(self):
    c = self.cfg
    self.img = VisionTransformer(c.vision)
    self.projector = Projector(c.projector, dtype=c.llm.dtype)
    self.llm = Decoder(c.llm)
    if c.anyres:  # HF: randn(E) / sqrt(E)
      init = nn.initializers.normal(c.llm.hidden_size**-0.5)
      self.image_newline = self.param("image_newline", logical(init, ("embed",)), (c.llm.hidden_size,))

  def embed_image(self, pixel_values):
    """float32[I, S, S, 3] (normalised NHWC) -> float[I, N, E] projected image features."""
    return self.projector(self.img(pixel_values))

  def embed_inputs(self, input_ids, pixel_values=None, image_mask=None, image_layout=None):
    """Token embeddings with image features merged in: float[B, T, E].

    ``pixel_values`` float32[I, S, S, 3] or [B, M, S, S, 3] (M image slots per sample,
    flattened row-major); ``image_mask`` bool[I] or [B, M] marks real images. Anyres
    configs: float32[I, P, S, S, 3] or [B, M, P, S, S, 3] and ``image_layout``.
    """
    c = self.cfg
    if c.anyres:
      return self.embed_inputs_anyres(input_ids, pixel_values, image_mask, image_layout)
    if image_layout is not None:
      raise ValueError("image_layout is for anyres configs (image_grid_pinpoints); this config has none")
    if pixel_values is not None and pixel_values.ndim == 5:
      pixel_values = pixel_values.reshape((-1,) + pixel_values.shape[2:])
    if image_mask is not None:
      image_mask = image_mask.reshape(-1).astype(bool)
    is_image = input_ids == c.image_token_id
    embeds = self.llm.embed(text_ids(input_ids, c))
    num_images = 0 if pixel_values is None else pixel_values.shape[0]
    if image_mask is not None:
      num_images = jnp.sum(image_mask)
    per_row = jnp.sum(is_image, axis=1)
    if not isinstance(per_row, jax.core.Tracer) and not isinstance(num_images, jax.core.Tracer):
      check_image_tokens(per_row, num_images, c.num_image_tokens)
    elif c.check_image_tokens:
      # Inside jit the counts are only known on device: a scalar-sized host check.
      jax.debug.callback(check_image_tokens, per_row, num_images, c.num_image_tokens)
    if pixel_values is None or pixel_values.shape[0] == 0:
      if self.is_initializing():
        self.embed_image(jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3)))
      return embeds
    return merge_image_features(embeds, input_ids, self.embed_image(pixel_values), c.image_token_id, image_mask)

  def embed_anyres_images(self, pixel_values, image_layout):
    """float32[I, P, S, S, 3] tiles + ``ImageLayout`` -> float[I, N, E] packed image tokens."""
    i, p = pixel_values.shape[:2]
    if p != self.cfg.tiles_per_image:
      raise ValueError(
          f"anyres pixel_values have {p} tiles per image; the config's budget is {self.cfg.tiles_per_image} "
          "(max_tiles_per_image): pad with data.anyres.pad_tiles"
      )
    feats = self.embed_image(pixel_values.reshape((i * p,) + pixel_values.shape[2:]))
    feats = feats.reshape((i, p) + feats.shape[1:])
    return anyres.pack_image_features(feats, self.image_newline, image_layout)

  def embed_inputs_anyres(self, input_ids, pixel_values, image_mask, image_layout):
    c = self.cfg
    is_image = input_ids == c.image_token_id
    embeds = self.llm.embed(text_ids(input_ids, c))
    per_row = jnp.sum(is_image, axis=1)
    if pixel_values is None or pixel_values.shape[0] == 0:
      if self.is_initializing():
        _ = self.image_newline
        self.embed_image(jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3)))
      if not isinstance(per_row, jax.core.Tracer):
        anyres.check_anyres_tokens(per_row, np.zeros(0, np.int32))
      return embeds
    if image_layout is None:
      raise ValueError("an anyres config needs image_layout (models.anyres.image_layout) with pixel_values")
    images_per_row = pixel_values.shape[1] if pixel_values.ndim == 6 else None
    if pixel_values.ndim == 6:
      pixel_values = pixel_values.reshape((-1,) + pixel_values.shape[2:])
    if pixel_values.ndim != 5:
      raise ValueError(f"anyres pixel_values must be [I, P, S, S, 3] or [B, M, P, S, S, 3], got {pixel_values.shape}")
    index, weight, num_tokens = (jnp.asarray(a) for a in image_layout)  # [I or B, M ...]: flatten the slots
    layout = anyres.ImageLayout(
        index.reshape((-1,) + index.shape[-2:]), weight.reshape((-1,) + weight.shape[-2:]), num_tokens.reshape(-1)
    )
    num_tokens = layout.num_tokens
    if image_mask is not None:
      num_tokens = jnp.where(image_mask.reshape(-1).astype(bool), num_tokens, 0)
    if not isinstance(per_row, jax.core.Tracer) and not isinstance(num_tokens, jax.core.Tracer):
      anyres.check_anyres_tokens(per_row, num_tokens, images_per_row)
    elif c.check_image_tokens:
      jax.debug.callback(anyres.check_anyres_tokens, per_row, num_tokens, images_per_row)
    feats = self.embed_anyres_images(pixel_values, layout)
    feature_mask = jnp.arange(feats.shape[1])[None, :] < num_tokens[:, None]
    return merge_image_features(embeds, input_ids, feats, c.image_token_id, feature_mask=feature_mask)

  def embed_videos(self, pixel_values_videos):
    """float32[V, F, S, S, 3] frames -> float[V, num_video_tokens(cfg, F), E] (``models.video``)."""
    c = self.cfg
    v, f = pixel_values_videos.shape[:2]
    frames = pixel_values_videos.reshape((v * f,) + pixel_values_videos.shape[2:])
    if c.video_pooling == "bilinear":  # OneVision: pool the projected grid, one newline per video
      feats = video.pool_frames(self.embed_image(frames), c).reshape(v, -1, c.llm.hidden_size)
      newline = jnp.broadcast_to(self.image_newline.astype(feats.dtype), (v, 1, feats.shape[-1]))
      return jnp.concatenate([feats, newline], axis=1)
    feats = self.projector(video.pool_frames(self.img(frames), c))  # NeXT-Video: pool the tower's grid
    return feats.reshape(v, -1, c.llm.hidden_size)

  def merge_videos(self, embeds, input_ids, pixel_values_videos=None, video_mask=None):
    """Writes each video's pooled frame tokens into its ``cfg.video_token_id`` placeholders.

    ``pixel_values_videos`` float32[V, F, S, S, 3] or [B, M, F, S, S, 3]; ``video_mask``
    bool[V] or [B, M] marks real videos. Returns float[B, T, E].
    """
    c = self.cfg
    if c.video_token_id is None:
      if pixel_values_videos is not None:
        raise ValueError("pixel_values_videos given, but this config has no video_token_id (no video support)")
      return embeds
    if pixel_values_videos is not None and pixel_values_videos.ndim == 6:
      pixel_values_videos = pixel_values_videos.reshape((-1,) + pixel_values_videos.shape[2:])
    if pixel_values_videos is not None and pixel_values_videos.ndim != 5:
      raise ValueError(
          f"pixel_values_videos must be [V, F, S, S, 3] or [B, M, F, S, S, 3], got {pixel_values_videos.shape}"
      )
    frames = None if pixel_values_videos is None else pixel_values_videos.shape[1]
    per_row = jnp.sum(input_ids == c.video_token_id, axis=1)
    num_videos = 0 if pixel_values_videos is None else pixel_values_videos.shape[0]
    if video_mask is not None:
      video_mask = video_mask.reshape(-1).astype(bool)
      num_videos = jnp.sum(video_mask)
    args = (per_row, num_videos, frames, video.num_video_tokens(c, frames or 0))
    if not isinstance(per_row, jax.core.Tracer) and not isinstance(num_videos, jax.core.Tracer):
      video.check_video_tokens(*args)
    elif c.check_image_tokens:
      jax.debug.callback(video.check_video_tokens, *args)
    if pixel_values_videos is None or pixel_values_videos.shape[0] == 0:
      return embeds
    feats = self.embed_videos(pixel_values_videos)
    return merge_image_features(embeds, input_ids, feats, c.video_token_id, video_mask)

  def __call__(
      self,
      input_ids,
      pixel_values=None,
      attention_mask=None,
      positions=None,
      image_mask=None,
      hidden_only: bool = False,
      image_layout=None,
      pixel_values_videos=None,
      video_mask=None,
  ):
    """LLaVA forward.

    Args:
      input_ids: int32[B, T] with ``cfg.image_token_id`` at image feature positions
        (``cfg.num_image_tokens`` per image; text-only rows have none).
      pixel_values: float32[I, S, S, 3] normalised NHWC, the batch's images in order,
        or None for a text-only batch.
      attention_mask: int[B, T], 1 for tokens, 0 for padding (left or right); packed
        rows: the segment id of each token (1, 2, ...), attention stays within a segment.
      positions: int32[B, T] RoPE positions; default counts valid tokens from 0 (packed
        rows pass their own, restarting per segment).
      image_mask: bool[I] (or [B, M] with 5-D pixel_values); False = padding image slot.
      image_layout: anyres configs only: ``models.anyres.ImageLayout`` of the images
        (``anyres.image_layout(image_sizes, cfg)``, computed on the host; its arrays
        [I, ...] or, as training batches carry them, [B, M, ...]); ``pixel_values`` are
        then float32[I, P, S, S, 3] tiles (or [B, M, P, S, S, 3]).
      hidden_only: return the LLM's last-layer output float[B, T, E] instead; ``head``
        (``apply(..., method=Llava.head)``) gives the logits of chosen positions.
      pixel_values_videos: video configs only: float32[V, F, S, S, 3] normalised frames
        (or [B, M, F, S, S, 3]); ``input_ids`` then holds
        ``models.video.num_video_tokens(cfg, F)`` ``cfg.video_token_id`` per video.
      video_mask: bool[V] (or [B, M]); False = padding video slot.
    Returns:
      logits float32[B, T, V].
    """
    embeds = self.embed_inputs(input_ids, pixel_values, image_mask, image_layout)
    embeds = self.merge_videos(embeds, input_ids, pixel_values_videos, video_mask)
    if positions is None:
      positions = default_positions(input_ids, attention_mask)
    segment_ids = None if attention_mask is None else attention_mask.astype(jnp.int32)
    return self.llm(embeds, positions, segment_ids, hidden_only=hidden_only)

  def head(self, hidden):
    """float[B, N, E] (from ``hidden_only``) -> float32[B, N, V] logits."""
    return self.llm.head(hidden)


def init_params(cfg: LlavaConfig, rng, *, batch: int = 1, seq_len: int = 8, boxed: bool = False):
  """Random params for ``cfg`` (plain nested dicts; ``boxed`` keeps logical-axis metadata)."""
  n, s = cfg.num_image_tokens, cfg.vision.image_size
  px = jnp.zeros((batch, s, s, 3), jnp.float32)
  layout = None
  if cfg.anyres:  # one S x S image per row: base tile + one grid tile
    layout = anyres.image_layout(np.full((batch, 2), s), cfg)
    n = int(layout.num_tokens[0])
    px = jnp.zeros((batch, cfg.tiles_per_image, s, s, 3), jnp.float32)
  ids = jnp.concatenate(
      [jnp.full((batch, n), cfg.image_token_id, jnp.int32), jnp.ones((batch, seq_len), jnp.int32)], axis=1
  )
  variables = Llava(cfg).init(rng, ids, px, image_layout=layout)
  return variables["params"] if boxed else nn.unbox(variables["params"])
