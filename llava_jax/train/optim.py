"""Optimizer: AdamW with warmup + cosine, global-norm clipping, weight-decay masks and
per-group learning rates / freezing chosen by regexes over ``/``-joined param names
(``img/…``, ``projector/…``, ``llm/…``), big_vision style.

Frozen params are labelled ``"frozen"``: they get ``optax.set_to_zero`` (no optimizer
state) and the train step wraps them in ``stop_gradient`` so XLA never computes their
weight gradients.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import optax

FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-3
  warmup_ratio: float = 0.03  # of total steps (LLaVA-1.5: 3 %)
  final_lr_ratio: float = 0.0  # cosine decays to learning_rate * final_lr_ratio
  total_steps: int = 1000
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0
  # (regex, lr multiplier) over param names, first match wins; multiplier 0 (or None)
  # freezes. Params no rule matches are frozen: training is opt-in per group.
  lr_rules: tuple[tuple[str, float | None], ...] = ((r"projector/.*", 1.0),)
  # Params matching these are excluded from weight decay (biases, norms, embeddings).
  no_decay: tuple[str, ...] = (
      r".*/bias$",
      r".*(norm|layrnorm|layernorm)[^/]*/scale$",
      r".*/(embedding|position_embedding|class_embedding|probe)$",
  )


def param_names(params: Any) -> Any:
  """Same-structure tree of ``/``-joined param paths (``llm/decoder/layers/mlp/up_proj/kernel``)."""

  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

  return jax.tree_util.tree_map_with_path(name, params)


def _match(name: str, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
  for pattern, value in rules:
    if re.fullmatch(pattern, name):
      return value
  return default


def lr_labels(params: Any, cfg: OptimConfig) -> Any:
  """Tree of group labels: ``"frozen"`` or ``"lr=<multiplier>"``."""

  def label(name):
    mult = _match(name, cfg.lr_rules, None)
    return FROZEN if not mult else f"lr={float(mult):g}"

  return jax.tree.map(label, param_names(params))


def trainable_mask(params: Any, cfg: OptimConfig) -> Any:
  return jax.tree.map(lambda l: l != FROZEN, lr_labels(params, cfg))


def schedule(cfg: OptimConfig, multiplier: float = 1.0) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_ratio * total_steps``, then cosine to the end."""
  peak = cfg.learning_rate * multiplier
  warmup = int(round(cfg.warmup_ratio * cfg.total_steps))
  decay = max(cfg.total_steps - warmup, 1)
  cosine = optax.cosine_decay_schedule(peak, decay, alpha=cfg.final_lr_ratio)
  if warmup == 0:  # no warmup: the first step already uses the peak rate
    return cosine
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), cosine], [warmup])


def make_optimizer(cfg: OptimConfig, params: Any) -> optax.GradientTransformation:
  """AdamW per learning-rate group with clipping over the trainable params only."""
  labels = lr_labels(params, cfg)
  groups = sorted(set(jax.tree.leaves(labels)) - {FROZEN})
  if not groups:
    raise ValueError(
        f"no trainable params: no lr_rules {cfg.lr_rules} match any param name "
        f"(names look like {jax.tree.leaves(param_names(params))[:3]})"
    )
  decay_mask = jax.tree.map(lambda n: _match(n, [(p, False) for p in cfg.no_decay], True), param_names(params))
  transforms = {FROZEN: optax.set_to_zero()}
  for g in groups:
    transforms[g] = optax.adamw(
        schedule(cfg, float(g.split("=")[1])),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
  # Frozen grads are exact zeros (stop_gradient), so the global norm is the trainable one.
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.multi_transform(transforms, labels))


def current_lr(cfg: OptimConfig, step) -> Any:
  """The base group's learning rate at ``step`` (for logging)."""
  return schedule(cfg)(step)
