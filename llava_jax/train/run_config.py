"""The run configuration: every key a config file may set, its type and its one default.

    run = run_config.parse(config)      # ml_collections.ConfigDict (or dict) -> RunConfig
    run.train.keep, run.data.policy, run.mesh.fsdp ...

Config files (``configs/*.py``) build a ``ConfigDict`` and the command line overrides it
(``--config.train.steps=10``); the trainer, the ahead-of-time compiler and the data
inspector read it once through ``parse``, which

- refuses unknown or misspelt keys, naming the key and the nearest known one
  (``train.stepz``: "did you mean train.steps?"); a config file's typo fails at start,
  not as a silently ignored setting;
- names every required key that is missing (``data.train``, ``train.steps`` ...);
- checks each value's type and, for choices, its value (``data.policy`` is "skip" or
  "raise");
- fills every default from the dataclasses below. Where a default belongs to a lower
  layer (the optimizer's warm-up, the step's loss normalisation) it is *that* layer's
  dataclass default, referenced, not restated.

The result is frozen: a run's settings cannot drift while it runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from llava_jax.train.optim import OptimConfig
from llava_jax.train.step import StepConfig

Pairs = tuple[tuple[str, Any], ...]


class ConfigError(ValueError):
  """A config key is unknown, missing, or has a value of the wrong type."""


ANYRES_KEYS = ("image_grid_pinpoints", "vision_aspect_ratio", "max_tiles_per_image", "max_image_tokens")
VIDEO_OPTION_KEYS = ("token", "pooling", "pool_stride")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  vision: str  # models.configs.VISION_VARIANTS key
  llm: str  # models.configs.LLM_VARIANTS key
  projector: str = "mlp2x_gelu"  # "linear" | "mlp2x_gelu"
  vocab_from_tokenizer: bool = False  # LLM vocabulary = the tokenizer's
  image_token: Union[str, int] = "<image>"  # placeholder token (or its id)
  vision_overrides: dict = dataclasses.field(default_factory=dict)  # VisionConfig fields
  llm_overrides: dict = dataclasses.field(default_factory=dict)  # LLMConfig fields
  # Any resolution (LLaVA-NeXT / OneVision): LlavaConfig's image_grid_pinpoints,
  # vision_aspect_ratio, max_tiles_per_image, max_image_tokens; None: LLaVA-1.5.
  anyres: Union[dict, None] = None
  # Videos through a video token (OneVision, NeXT-Video): {"token": "<video>" (a token of
  # the tokenizer, or an id), "pooling": "bilinear" | "average", "pool_stride": int};
  # None: a video is its frames, as images (data.video_frames).
  video: Union[dict, None] = None

  def __post_init__(self):
    from llava_jax.models.configs import LLMConfig, VisionConfig

    known = set(ANYRES_KEYS)
    for name in self.anyres or {}:
      if name not in known:
        raise ConfigError(f"unknown config key model.anyres.{name}{_suggest(name, known, 'model.anyres.')}")
    for name in self.video or {}:
      if name not in VIDEO_OPTION_KEYS:
        raise ConfigError(f"unknown config key model.video.{name}{_suggest(name, VIDEO_OPTION_KEYS, 'model.video.')}")
    if self.anyres is not None and not self.anyres.get("image_grid_pinpoints"):
      raise ConfigError("model.anyres needs image_grid_pinpoints ([[height, width], ...], multiples of the tile)")

    for key, cls in (("vision_overrides", VisionConfig), ("llm_overrides", LLMConfig)):
      known = {f.name for f in dataclasses.fields(cls)}
      for name in getattr(self, key):
        if name not in known:
          raise ConfigError(
              f"unknown config key model.{key}.{name}"
              f"{_suggest(name, known, f'model.{key}.')}; "
              f"{cls.__name__} has {sorted(known)}"
          )


@dataclasses.dataclass(frozen=True)
class DataOptions:
  train: str  # LLaVA JSON/JSONL, array_record dir or tfds:name
  tokenizer: str  # sentencepiece model / HF tokenizer dir
  template: str  # data.templates name, "hf", or NAME@inline / @llava_next / @llava (image placement)
  max_len: int  # tokens per row
  val: str = ""  # held-out set for the teacher-forced eval
  image_root: str = ""  # folder the records' image paths are under
  eval_questions: str = ""  # demo / llava_jax.evaluate inputs
  eval_annotations: str = ""
  max_images: int = 1  # image slots per row (packed: per row too)
  # anyres: an image needing more tiles/tokens than a slot holds (data.anyres_example)
  over_budget: Literal["reject", "downscale"] = "reject"
  video_frames: int = 0  # F frames sampled uniformly per video (0: records with videos are rejected)
  max_videos: int = 0  # video slots per row (models with model.video); others count frames as images
  policy: Literal["skip", "raise"] = "skip"  # a bad record is counted and skipped, or stops
  workers: int = 0  # grain worker processes (0: in-process)
  read_threads: Union[int, None] = None  # parallel image reads (None: by storage)
  image_mode: Union[Literal["square", "pad", "resize"], None] = None  # None: the tower's
  pack: bool = False  # several conversations per row
  pack_bins: Union[int, None] = None  # packing look-ahead (None: the packer's)
  synthetic: Union[dict, None] = None  # write_synthetic(dir=..., **kwargs) first

  def __post_init__(self):
    if self.template != "hf":  # a misspelt template or placement: refused before any work
      from llava_jax.data.templates import get_template

      try:
        get_template(self.template)
      except ValueError as e:
        raise ConfigError(f"data.template: {e}") from None
    if self.synthetic is not None:
      import inspect

      from llava_jax.data.synthetic import write_synthetic

      known = {"dir"} | set(inspect.signature(write_synthetic).parameters) - {"out_dir"}
      for name in self.synthetic:
        if name not in known:
          raise ConfigError(f"unknown config key data.synthetic.{name}{_suggest(name, known, 'data.synthetic.')}")
      if not self.synthetic.get("dir"):
        raise ConfigError("data.synthetic needs a dir (where the embedded dataset is written)")


@dataclasses.dataclass(frozen=True)
class OptimOptions:
  lr: float
  warmup_ratio: float = OptimConfig.warmup_ratio
  final_lr_ratio: float = OptimConfig.final_lr_ratio
  weight_decay: float = OptimConfig.weight_decay
  grad_clip: float = OptimConfig.grad_clip
  lr_rules: Pairs = OptimConfig.lr_rules  # (regex, multiplier); unmatched params freeze


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  steps: int
  batch_size: int  # global: over every process and device
  grad_accum: int = StepConfig.grad_accum
  loss_norm: Literal["token", "example"] = StepConfig.loss_norm
  target_fraction: Union[float, None] = StepConfig.target_fraction
  log_every: int = 10
  ckpt_every: int = 1000
  keep: int = 2  # checkpoints kept
  async_checkpoint: bool = True
  eval_every: int = 0  # 0: no held-out evaluation during training
  eval_batch_size: Union[int, None] = None  # None: batch_size
  peak_tflops: Union[float, None] = None  # per chip, for MFU; None: measured
  tensorboard: bool = True
  progress: bool = True  # a live bar on a terminal
  on_nonfinite: Literal["stop", "skip"] = "stop"
  max_nonfinite: int = 10  # skipped updates allowed under "skip"
  checkpoint_on_stop: bool = True  # SIGTERM/SIGINT: checkpoint, then exit
  on_corrupt_checkpoint: Literal["fallback", "raise"] = "fallback"
  crash_after_step: Union[int, None] = None  # fault injection (tests): exit 42 after it


@dataclasses.dataclass(frozen=True)
class MeshOptions:
  """Devices per mesh axis (one may be -1: the rest); an axis not named is 1.

  ``dcn_*`` split an axis across slices (multi-slice TPU; see ``sharding.make_mesh``).
  """

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1

  def ici(self) -> dict[str, int]:
    from llava_jax.sharding import MESH_AXES

    return {a: getattr(self, a) for a in MESH_AXES}

  def dcn(self) -> dict[str, int]:
    from llava_jax.sharding import MESH_AXES

    return {a: getattr(self, f"dcn_{a}") for a in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class InitOptions:
  """Weights to start from (``train.loop.initial_params``); none set: random init."""

  hf_llava: Union[str, None] = None
  vision_hf: Union[str, None] = None
  llm_hf: Union[str, None] = None
  from_run: Union[str, None] = None
  from_run_params: str = r"projector/.*"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelOptions
  data: DataOptions
  optim: OptimOptions
  train: TrainOptions
  # No mesh section at all: data parallel over every device.
  mesh: MeshOptions = MeshOptions(data=-1)
  init: InitOptions = InitOptions()
  seed: int = 0
  sharding_rules: Pairs = ()  # logical-axis rule overrides (sharding.py)


def skeleton():
  """A ``ConfigDict`` with every key of ``RunConfig`` and its default, for config files.

  Config files start from it and set what their run changes (``configs/*.py``), so every
  key exists for ``--config.section.key=value`` overrides. Keys without a default
  (``data.train``, ``train.steps`` ...) and defaults of None are typed placeholders: a
  file that forgets a required key fails in ``parse``, naming it, and
  ``--config.init.from_run=DIR`` can be set where the default is None.
  """
  import ml_collections
  from ml_collections.config_dict import placeholder

  def section(cls) -> dict:
    out, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      hint = hints[f.name]
      if dataclasses.is_dataclass(hint):
        out[f.name] = section(hint)
        if f.default is not dataclasses.MISSING:  # a non-default section default (mesh)
          out[f.name].update({k: v for k, v in dataclasses.asdict(f.default).items()})
        continue
      if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
      elif f.default is dataclasses.MISSING:
        value = None
      else:
        value = f.default
      if value is None:
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = kinds[0]
        if typing.get_origin(kind) is Literal:
          kind = type(typing.get_args(kind)[0])
        if kind is dict:
          continue  # an optional section (data.synthetic): a file adds it whole
        value = placeholder(kind if isinstance(kind, type) else object)
      elif isinstance(value, tuple):
        value = [list(p) for p in value]
      out[f.name] = value
    return out

  return ml_collections.ConfigDict(section(RunConfig))


def parse_arg(arg: str, *, positional: str | None = None, **defaults) -> dict:
  """A config file's argument, ``"size=13b,data=/d"`` -> dict, ``defaults`` filled in.

  ``--config=configs/x.py:size=13b,data=/d``; unknown names are refused (with the known
  ones), so a typo never silently keeps a default. A bare first value is ``positional``'s
  (``tiny_shapes.py:stage2,root=/r``).
  """
  out = dict(defaults)
  for i, part in enumerate(filter(None, (arg or "").split(","))):
    key, sep, value = part.partition("=")
    if not sep and i == 0 and positional is not None:
      key, value = positional, part
    elif not sep:
      raise ValueError(f"config argument {part!r}: expected name=value; names: {sorted(out)}")
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}{_suggest(key, out)}; expected {sorted(out)}")
    out[key] = value
  return out


def parse(config) -> RunConfig:
  """The validated, typed run config of a ConfigDict / dict (a RunConfig is returned as is)."""
  if isinstance(config, RunConfig):
    return config
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return _build(RunConfig, d, "")


def to_dict(run: RunConfig) -> dict:
  """Plain JSON-able dict of every setting, defaults included (``run.json``)."""
  return dataclasses.asdict(run)


def _suggest(name: str, known, prefix: str = "") -> str:
  close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
  return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _build(cls, d: Any, prefix: str):
  if not isinstance(d, dict):
    raise ConfigError(f"config {prefix.rstrip('.') or 'root'}: expected a section (dict), got {type(d).__name__} {d!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  for key in d:
    if key not in fields:
      raise ConfigError(
          f"unknown config key {prefix}{key}{_suggest(key, fields, prefix)}; "
          f"{prefix.rstrip('.') or 'the config'} takes {sorted(fields)}"
      )
  kwargs = {}
  for name, f in fields.items():
    if d.get(name) is None and type(None) not in typing.get_args(hints[name]):
      d = {k: v for k, v in d.items() if k != name}  # an unfilled placeholder: not set
    if name not in d:
      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise ConfigError(f"config key {prefix}{name} is required")
      continue
    kwargs[name] = _value(hints[name], d[name], prefix + name)
  return cls(**kwargs)


def _value(hint, value, key: str):
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for option in (a for a in args if a is not type(None)):
      try:
        return _value(option, value, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(
        errors[-1]
        if len(errors) == 1
        else f"config key {key}: {value!r} is none of the accepted kinds ({'; '.join(errors)})"
    )
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"config key {key}: {value!r}; expected one of {list(args)}")
    return value
  if dataclasses.is_dataclass(hint):
    return _build(hint, value, key + ".")
  if origin is tuple:  # Pairs: a list of (name, value) pairs
    if not isinstance(value, (list, tuple)) or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in value):
      raise ConfigError(f"config key {key}: expected a list of (name, value) pairs, got {value!r}")
    return tuple(tuple(p) for p in value)
  if hint is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"config key {key}: expected a dict, got {value!r}")
    return dict(value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float, str, bool):
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
      raise ConfigError(f"config key {key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
  raise TypeError(f"run_config: no rule for {hint!r} ({key})")  # a schema bug, not the user's
