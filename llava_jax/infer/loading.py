"""One entry point that turns a checkpoint directory into everything inference needs.

    m = load_model("path/to/dir")          # LoadedModel(cfg, params, tokenizer, template, …)

Three kinds of directory are recognised, in this order:

* a training workdir: ``DIR/run.json`` (``llava_jax.checkpoint.orbax.load_run``; the run
  records its tokenizer, template and image preprocessing);
* a Hugging Face ``LlavaForConditionalGeneration`` (or any-resolution
  ``LlavaNext`` / ``LlavaOnevision``) directory: ``config.json`` with ``model_type``
  ``"llava"`` / ``"llava_next"`` / ``"llava_onevision"`` and a ``text_config``
  (``load_hf_llava``), the tokenizer in the same directory, the template guessed from
  the text model family, the image preprocessing from ``preprocessor_config.json``;
* an original LLaVA directory: ``config.json`` with ``mm_vision_tower`` /
  ``mm_projector_type`` (``load_llava_original``).

With ``mesh=`` (``llava_jax.sharding.make_mesh``, possibly spanning several processes)
the params come back as global ``jax.Array``s sharded by the modules' logical axes
(``sharding.param_shardings``): a training workdir is restored by orbax straight onto
those shardings; converted checkpoints are read on every process and placed leaf by
leaf with ``jax.make_array_from_callback`` (each process fills only its own devices).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, NamedTuple

import numpy as np

from llava_jax import storage
from llava_jax.checkpoint.convert.common import read_json
from llava_jax.data.images import CLIP_MEAN, CLIP_STD, ImageConfig, image_config_for
from llava_jax.data.templates import IMAGE_TAG, VIDEO_TAG, get_template, prompt_for_generation
from llava_jax.data.tokenize import tokenize_prompt
from llava_jax.infer import media
from llava_jax.models.configs import LlavaConfig
from llava_jax.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# HF model types ``load_hf_llava`` reads (``checkpoint.convert.hf.LLAVA_TYPES``).
HF_LLAVA_TYPES = ("llava", "llava_next", "llava_onevision")

# Text model family (``checkpoint.convert.hf.llm_family``) -> conversation template.
# Llama-family LLaVA (1.5, vicuna) uses LLaVA's conv_llava_v1.
FAMILY_TEMPLATES = {"llama": "llava_v1", "mistral": "mistral_instruct", "qwen2": "chatml", "gemma": "gemma"}


class Media(NamedTuple):
  """A prompt's preprocessed images and videos (``LoadedModel.preprocess_media``).

  pixels, image_sizes: as ``LoadedModel.preprocess_images`` (a frames-as-images model's
  video frames among them); pixel_values_videos: float32[V, F, S, S, 3] or None (video
  configs); video_frames: [F] per video in tag order, or None without videos.
  """

  pixels: np.ndarray | None
  image_sizes: np.ndarray | None
  pixel_values_videos: np.ndarray | None
  video_frames: list[int] | None


@dataclasses.dataclass
class LoadedModel:
  """A model ready for ``sampler.generate``.

  Attributes:
    cfg: the LlavaConfig; params: nested dict of arrays ``{"img", "projector", "llm"}``.
    tokenizer: ``llava_jax.tokenizer.Tokenizer``; template: a ``TEMPLATES`` name.
    image_config: how raw images are preprocessed; step: training step (None for
      converted checkpoints). source: "run" | "hf" | "llava_original".
    mesh, rules: the mesh the params are placed on (and logical-rule overrides), or None
      (params as loaded: host numpy / one device); passed on to ``sampler.generate``.
  """

  cfg: LlavaConfig
  params: Any
  tokenizer: Tokenizer
  template: str
  image_config: ImageConfig
  step: int | None = None
  source: str = "hf"
  mesh: Any = None
  rules: Any = None

  def image_token_counts(self, image_sizes) -> list[int]:
    """Image placeholders of each image: ``cfg.num_image_tokens`` (LLaVA-1.5), or for
    anyres configs ``models.anyres.num_image_tokens(size, cfg)`` of its (height, width).

    Raises ValueError naming the image when it needs more tiles or tokens than the
    config's fixed budget (``cfg.tiles_per_image`` / ``cfg.image_token_budget``)."""
    if not self.cfg.anyres:
      return [self.cfg.num_image_tokens] * len(image_sizes)
    from llava_jax.models import anyres

    counts = []
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    square = anyres.square_images(self.cfg, len(sizes))  # OneVision, several images: one tile each
    for k, size in enumerate(sizes):
      size = (int(size[0]), int(size[1]))
      try:
        n = anyres.num_image_tokens(size, self.cfg, square)
      except ValueError as e:
        raise ValueError(f"image {k + 1} of {len(image_sizes)}: {e}") from e
      if n > self.cfg.image_token_budget:
        raise ValueError(
            f"image {k + 1} of {len(image_sizes)} (height x width {size[0]} x {size[1]}) packs to {n} image tokens, "
            f"more than the config's budget of {self.cfg.image_token_budget} (max_image_tokens)"
        )
      counts.append(n)
    return counts

  def encode_prompt(self, conversation, image_sizes=None, video_frames=None) -> tuple[str, np.ndarray]:
    """A conversation ending with a user turn (``<image>`` / ``<video>`` tags where the
    media go) -> (prompt text, int32[T] ids with the placeholders expanded).

    Each ``<image>`` becomes ``cfg.num_image_tokens`` placeholders; anyres configs
    (``cfg.anyres``): ``image_sizes`` int[I, 2], the (height, width) of the I images in
    tag order (``preprocess_images`` returns them), and each tag becomes that image's
    ``image_token_counts`` placeholders (a tag count that differs from I is a ValueError;
    LLaVA-1.5 configs ignore ``image_sizes``).

    ``video_frames``: each ``<video>``'s frame count F in tag order (or one int for all).
    With ``cfg.video_token_id`` a tag becomes ``models.video.num_video_tokens(cfg, F)``
    ids ``cfg.video_token_id``; without, F ``<image>`` tags separated by spaces (the
    frames are then images: ``image_sizes`` counts them, ``preprocess_media``). The
    returned text is the rendered prompt, before the expansion of the ``<video>`` tags
    for video configs, after it for the others."""
    frames = media.frames_per_video(video_frames, media.count_videos(conversation))
    if frames and self.cfg.video_token_id is None:
      conversation, frames = media.expand_videos_as_images(conversation, frames), []
    text = prompt_for_generation(conversation, self.template, self.tokenizer)
    tiled = self.cfg.anyres
    if not tiled and not frames:
      ids = tokenize_prompt(
          text,
          self.tokenizer,
          image_token_id=self.cfg.image_token_id,
          num_image_tokens=self.cfg.num_image_tokens,
          template=self.template,
      )
      return text, ids
    # One id per tag (videos tokenized as images are, split at the tag), then each expanded.
    ids = tokenize_prompt(
        text.replace(VIDEO_TAG, IMAGE_TAG),
        self.tokenizer,
        image_token_id=self.cfg.image_token_id,
        num_image_tokens=1,
        template=self.template,
    )
    at = np.flatnonzero(ids == self.cfg.image_token_id)
    is_video = np.asarray([tag == VIDEO_TAG for tag in media.tag_order([{"value": text}])], bool)
    if len(is_video) != len(at) or int(is_video.sum()) != len(frames):
      raise ValueError(
          f"template {self.template!r} rendered {len(frames)} {VIDEO_TAG} tag(s) as {int(is_video.sum())} and "
          f"{len(at)} media tags in all as {len(is_video)} ids: a template that drops or adds tags cannot take videos"
      )
    repeats = np.ones(len(ids), np.int64)
    num_images = int((~is_video).sum())
    if tiled:
      sizes = np.zeros((0, 2), np.int64) if image_sizes is None else np.asarray(image_sizes).reshape(-1, 2)
      if num_images != len(sizes):
        raise ValueError(
            f"the prompt has {num_images} image tag(s) but {len(sizes)} image size(s) were given; "
            "an anyres model needs each image's (height, width) (LoadedModel.preprocess_images returns them)"
        )
      repeats[at[~is_video]] = self.image_token_counts(sizes)
    else:
      repeats[at[~is_video]] = self.cfg.num_image_tokens
    if frames:
      from llava_jax.models.video import num_video_tokens

      ids[at[is_video]] = self.cfg.video_token_id
      repeats[at[is_video]] = [num_video_tokens(self.cfg, f) for f in frames]
    return text, np.repeat(ids, repeats).astype(np.int32)

  def preprocess_images(self, images) -> tuple[np.ndarray | None, np.ndarray | None]:
    """PIL images (or uint8 arrays) in tag order -> ``(pixels, image_sizes)`` for ``generate``.

    LLaVA-1.5 configs: float32[I, S, S, 3] (``data.images.preprocess`` with
    ``image_config``) and None. Anyres configs: float32[I, P, S, S, 3] tiles
    (``data.anyres.preprocess_anyres``, zero tiles up to P = ``cfg.tiles_per_image``) and
    int32[I, 2] original (height, width). No images: (None, None).
    """
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
      return None, None
    if not self.cfg.anyres:
      from llava_jax.data.images import preprocess

      return np.stack([preprocess(im, self.image_config) for im in images]), None
    from llava_jax.data import anyres
    from llava_jax.models.anyres import square_images

    tiles, sizes = [], []
    square = square_images(self.cfg, len(images))  # OneVision, several images: one padded tile each
    for k, im in enumerate(images):
      try:
        if square:
          t, size = anyres.preprocess_square(im, self.image_config)
        else:
          t, size = anyres.preprocess_anyres(im, self.image_config, self.cfg.image_grid_pinpoints)
          self.image_token_counts([size])
        tiles.append(anyres.pad_tiles(t, self.cfg.tiles_per_image))
      except ValueError as e:
        raise ValueError(f"image {k + 1} of {len(images)}: {e}") from e
      sizes.append(size)
    return np.stack(tiles), np.asarray(sizes, np.int32)

  def preprocess_videos(self, videos) -> np.ndarray | None:
    """Video configs: uint8[F, H, W, 3] frames per video (same F for all) ->
    float32[V, F, S, S, 3] (``media.video_image_config``); no videos: None."""
    videos = media.as_list(videos)
    if not videos:
      return None
    if self.cfg.video_token_id is None:
      raise ValueError(
          "this model has no video_token_id: its videos are frames given as images (preprocess_media, "
          "encode_prompt(..., video_frames=))"
      )
    counts = [len(v) for v in videos]
    if len(set(counts)) > 1:
      raise ValueError(f"every video of a prompt needs the same number of frames, got {counts}")
    from llava_jax.data.images import preprocess

    config = media.video_image_config(self.cfg, self.image_config)
    return np.stack([np.stack([preprocess(frame, config) for frame in v]) for v in videos])

  def preprocess_media(self, conversation, images=None, videos=None, *, num_frames=8, fps=None) -> Media:
    """The images and videos of ``conversation``'s tags, in tag order, for ``generate``.

    Args:
      images: PIL images (or uint8 arrays), one per ``<image>``, or one, or None.
      videos: one per ``<video>``: paths, encoded bytes, uint8[F, H, W, 3] frames or
        ``data.video.VideoFrames``; files are sampled to ``num_frames`` frames (or by
        ``fps``, frames per second).
    Returns: ``Media``; give ``video_frames`` and ``image_sizes`` to ``encode_prompt``.
      A model without ``cfg.video_token_id`` gets each video's frames as images, in
      place among the images (``media.interleave``).
    Raises: ValueError naming a bad video file, or when tags and media differ in number.
    """
    images = media.as_list(images)
    videos = media.load_videos(videos, num_frames, fps)
    frames = [len(v) for v in videos] or None
    pixel_values_videos = None
    if videos and self.cfg.video_token_id is None:
      images = media.interleave(conversation, images, videos)
    else:
      pixel_values_videos = self.preprocess_videos(videos)
    pixels, sizes = self.preprocess_images(images)
    return Media(pixels, sizes, pixel_values_videos, frames)

  def decode(self, ids) -> str:
    """Ids -> text, special tokens dropped; ids the tokenizer does not have (the image
    placeholder, the padded rows of a model's vocabulary) are dropped too."""
    n = self.tokenizer.vocab_size
    return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < n])

  def decode_answer(self, ids) -> str:
    """Generated ids -> answer text: cut after the first stop token and at the template's
    stop string, special tokens dropped, surrounding whitespace stripped."""
    ids = [int(i) for i in ids]
    stops = set(self.stop_token_ids())
    for k, i in enumerate(ids):
      if i in stops:
        ids = ids[:k]
        break
    text = self.decode(ids)
    stop = self.stop_text()
    if stop and stop in text:
      text = text[: text.index(stop)]
    return text.strip()

  def answer(
      self, conversation, image=None, video=None, *, num_frames: int = 8, fps=None, max_new_tokens: int = 64
  ) -> str:
    """Greedy answer to a conversation ending with a user turn. ``image``: a PIL image for
    its ``<image>`` tag, or a list of them, one per tag in order (``preprocess_images``:
    tiles and sizes for anyres configs), or None. ``video``: a path, bytes or frames for
    its ``<video>`` tag, or a list of them, sampled to ``num_frames`` (or by ``fps``)
    (``preprocess_media``)."""
    from llava_jax.infer.sampler import generate

    pixels, sizes, videos, frames = self.preprocess_media(conversation, image, video, num_frames=num_frames, fps=fps)
    _, ids = self.encode_prompt(conversation, sizes, frames)
    out = generate(
        self.cfg,
        self.params,
        ids[None],
        pixels,
        image_sizes=sizes,
        pixel_values_videos=videos,
        max_new_tokens=max_new_tokens,
        stop_token_ids=self.stop_token_ids(),
        mesh=self.mesh,
        rules=self.rules,
    )
    return self.decode_answer(np.asarray(out)[0])

  def stop_text(self) -> str:
    """The template's end-of-answer string ("hf": the checkpoint's chat template's)."""
    return get_template(self.template, self.tokenizer).stop

  def stop_token_ids(self) -> list[int]:
    """EOS plus the template's stop string when that is a single token (e.g. ``<|im_end|>``)."""
    ids = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
    stop = self.stop_text()
    single = self.tokenizer.token_to_id(stop) if stop else None
    if single is not None and single not in ids and single != self.tokenizer.unk_id:
      ids.append(single)
    return ids


def guess_template(cfg: LlavaConfig) -> str:
  """Conversation template for the text model family of ``cfg``."""
  from llava_jax.checkpoint.convert.hf import llm_family

  return FAMILY_TEMPLATES[llm_family(cfg.llm)]


def parse_mesh_shape(text: str) -> list[int]:
  """A ``--mesh`` flag value ``"data,fsdp,tensor"`` (e.g. ``"-1,1,1"``) -> [-1, 1, 1]."""
  try:
    shape = [int(x) for x in text.split(",")]
  except ValueError:
    shape = []
  if len(shape) != 3:
    raise ValueError(f"{text!r} is not three comma-separated sizes data,fsdp,tensor such as -1,1,1")
  return shape


def param_shardings(cfg: LlavaConfig, mesh, rules=None):
  """NamedShardings on ``mesh`` for the param tree of ``cfg`` (from the logical axes)."""
  import jax

  from llava_jax import sharding
  from llava_jax.models.llava import init_params

  boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), boxed=True))
  return sharding.param_shardings(boxed, mesh, rules)


def place_params(params, shardings):
  """Host params (nested dict of numpy arrays, the same on every process) -> global
  ``jax.Array``s with ``shardings`` (same tree), one leaf at a time; a process only
  copies the slices its own devices hold, so no jit ever sees a host array."""
  import jax

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  targets = treedef.flatten_up_to(shardings)
  placed = []
  for (path, leaf), target in zip(flat, targets):
    host = np.asarray(leaf)
    try:
      placed.append(jax.make_array_from_callback(host.shape, target, lambda i, h=host: h[i]))
    except ValueError as e:
      raise ValueError(f"param {jax.tree_util.keystr(path)} {host.shape}: cannot place with {target}: {e}") from e
  return jax.tree_util.tree_unflatten(treedef, placed)


def _hf_image_config(path: str, cfg: LlavaConfig) -> ImageConfig:
  """From ``preprocessor_config.json`` when present, else the tower family's processor."""
  pre = storage.join(path, "preprocessor_config.json")
  base = image_config_for(cfg.vision.kind, cfg.vision.image_size)
  if not storage.exists(pre):
    return base
  d = read_json(pre)
  points = d.get("image_grid_pinpoints")
  if cfg.anyres and points is not None and tuple(map(tuple, points)) != tuple(map(tuple, cfg.image_grid_pinpoints)):
    raise ValueError(
        f"{pre}: image_grid_pinpoints {points} differ from config.json's {[list(p) for p in cfg.image_grid_pinpoints]}; "
        "the images would be tiled on one grid and packed on another"
    )
  crop = bool(d.get("do_center_crop", base.mode == "square"))
  return ImageConfig(
      size=cfg.vision.image_size,
      mode="square" if crop else "resize",
      mean=tuple(d.get("image_mean", base.mean)),
      std=tuple(d.get("image_std", base.std)),
      crop=crop,
  )


def load_model(
    path: str | os.PathLike,
    *,
    template: str | None = None,
    step: int | None = None,
    vision_tower_path: str | None = None,
    tokenizer_path: str | None = None,
    llm_overrides: dict | None = None,
    mesh=None,
    rules=None,
) -> LoadedModel:
  """Loads a training workdir, a HF LLaVA directory or an original LLaVA directory.

  Args:
    path: the directory.
    template: overrides the recorded / guessed conversation template.
    step: training workdirs only; None = latest checkpoint.
    vision_tower_path: original LLaVA only; local CLIP directory (else ``mm_vision_tower``).
    tokenizer_path: where the tokenizer is, if not in ``path``.
    llm_overrides: converted checkpoints only; non-architectural LLM fields
      (e.g. ``{"dtype": "bfloat16", "remat": "none"}``).
    mesh, rules: place the params sharded on this mesh (see the module docstring); with
      several processes every process calls ``load_model`` with the same arguments.
  Raises:
    FileNotFoundError / ValueError saying which files were expected and what was found.
  """
  path = storage.check(path, "checkpoint")  # local or a bucket (llava_jax.storage)
  if template is not None and template != "hf":  # "hf" needs the tokenizer: checked on use
    get_template(template)  # fail before loading gigabytes
  if not storage.isdir(path):
    raise FileNotFoundError(f"checkpoint {path!r} is not a directory")
  placed = dict(mesh=mesh, rules=rules)
  if storage.exists(storage.join(path, "run.json")):
    from llava_jax.checkpoint.orbax import load_run, read_run_info

    shardings = None
    if mesh is not None:
      cfg = LlavaConfig.from_dict(read_run_info(path)["model"])
      shardings = param_shardings(cfg, mesh, rules)
    run = load_run(path, step=step, shardings=shardings)
    if run.template == "plain" and template is None:
      log.warning(
          "%s was trained with the 'plain' template (stage 1: image captions); it has "
          "not seen instructions, so it will answer with captions. Use a stage-2 run "
          "(or pass --template to override).",
          path,
      )
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else run.tokenizer
    return LoadedModel(run.cfg, run.params, tok, template or run.template, run.image, run.step, source="run", **placed)
  config_path = storage.join(path, "config.json")
  if not storage.exists(config_path):
    raise FileNotFoundError(
        f"{path}: neither run.json (training workdir) nor config.json "
        f"(HF / original LLaVA) found; contents: {storage.listdir(path)[:20]}"
    )
  d = read_json(config_path)
  tok = load_tokenizer(tokenizer_path or path)
  overrides = {"remat": "none", **(llm_overrides or {})}
  if "text_config" in d and d.get("model_type") in HF_LLAVA_TYPES:
    from llava_jax.checkpoint.convert.hf import load_hf_llava

    cfg, params = load_hf_llava(path, llm_overrides=overrides)
    if mesh is not None:
      params = place_params(params, param_shardings(cfg, mesh, rules))
    return LoadedModel(
        cfg, params, tok, template or guess_template(cfg), _hf_image_config(path, cfg), None, source="hf", **placed
    )
  if "mm_vision_tower" in d or "mm_projector_type" in d or "mm_hidden_size" in d:
    from llava_jax.checkpoint.convert import llava_original

    cfg, params = llava_original.load_llava_original(path, vision_tower_path=vision_tower_path, llm_overrides=overrides)
    mode = "pad" if llava_original.prompt_options(d)["image_aspect_ratio"] == "pad" else None
    image = image_config_for(cfg.vision.kind, cfg.vision.image_size, mode)
    if cfg.vision.kind == "clip":
      image = dataclasses.replace(image, mean=CLIP_MEAN, std=CLIP_STD)
    if mesh is not None:
      params = place_params(params, param_shardings(cfg, mesh, rules))
    return LoadedModel(
        cfg, params, tok, template or guess_template(cfg), image, None, source="llava_original", **placed
    )
  raise ValueError(
      f"{config_path}: model_type {d.get('model_type')!r} is neither a HF LLaVA "
      f"(model_type one of {HF_LLAVA_TYPES} with text_config) nor an original LLaVA config "
      "(mm_vision_tower / mm_projector_type)"
  )
