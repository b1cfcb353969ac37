"""Pure training/eval step functions: ``train_step(state, batch) -> (state, metrics)``.

Batches (from ``llava_jax.data.pipeline``): ``input_ids int32[B, T]``, ``labels
int32[B, T]`` (IGNORE = -100 except assistant answers), ``attention_mask int32[B, T]``
(0 = padding; packed rows: segment ids 1, 2, ... one per example), ``positions
int32[B, T]`` (optional; RoPE positions restarting per example),
``pixel_values float32[B, M, S, S, 3]``, ``image_mask bool[B, M]``; any-resolution
configs: ``pixel_values float32[B, M, P, S, S, 3]`` and the layout keys ``image_index``,
``image_weight``, ``image_tokens`` (``data.anyres_example``); video slots:
``pixel_values_videos float32[B, V, F, S, S, 3]``, ``video_mask bool[B, V]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from llava_jax.data.anyres_example import LAYOUT_KEYS
from llava_jax.data.tokenize import IGNORE
from llava_jax.models.configs import LlavaConfig
from llava_jax.models.llava import Llava
from llava_jax.models.video import VIDEO_KEYS

MODEL_KEYS = ("input_ids", "labels", "attention_mask", "positions", "pixel_values", "image_mask")


def model_keys(cfg: LlavaConfig, *, videos: bool = False) -> tuple[str, ...]:
  """The batch keys the step reads: ``MODEL_KEYS``, plus the image layout of anyres configs
  (``data.anyres_example.LAYOUT_KEYS``) and, with ``videos`` (video slots), ``VIDEO_KEYS``."""
  return MODEL_KEYS + (LAYOUT_KEYS if cfg.anyres else ()) + (VIDEO_KEYS if videos else ())


def apply_model(model: Llava, params, batch, **kwargs):
  """``model`` on a batch's model keys (an anyres batch's layout, a batch's videos
  included); kwargs as ``Llava.__call__``."""
  layout = None
  if "image_index" in batch:
    layout = (batch["image_index"], batch["image_weight"], batch["image_tokens"])
  return model.apply(
      {"params": params},
      batch["input_ids"],
      batch.get("pixel_values"),
      batch.get("attention_mask"),
      positions=batch.get("positions"),
      image_mask=batch.get("image_mask"),
      image_layout=layout,
      pixel_values_videos=batch.get("pixel_values_videos"),
      video_mask=batch.get("video_mask"),
      **kwargs,
  )


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32[]
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key data (checkpointable)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  grad_accum: int = 1  # microbatches per optimizer step (scan, one update)
  loss_norm: str = "token"  # "token": mean over target tokens; "example": mean of per-example means
  # LM head + loss only at target positions: at most ceil(target_fraction * T) per row
  # (a batch with a fuller row runs the full head instead; no target is ever dropped).
  # Instruction data learns on a minority of positions (never on image tokens), and the
  # head is a large share of a small LLM's FLOPs (Qwen2-0.5B: 27%) and of its memory
  # (float32 [B, T, V] logits). None: the head on every position.
  target_fraction: float | None = None

  def __post_init__(self):
    f = self.target_fraction
    if f is not None and not 0 < f <= 1:
      raise ValueError(f"target_fraction must be in (0, 1] or None, got {f}")


def next_token_targets(labels, attention_mask=None):
  """The target of each position and its weight, aligned with the logits.

  Args: labels int32[B, T] (label t is the target at position t, as in HF: logits[:, t]
  predicts labels[:, t+1]); attention_mask int[B, T], 0 on padding, else the token's
  segment id (1 for unpacked rows).
  Returns: (targets int32[B, T], IGNORE replaced by 0; weights float32[B, T]): entry t
  is labels[:, t+1], with weight 0 at the last position, where it is IGNORE, and where
  t and t+1 are in different segments (a packed row's example never predicts the next
  example's first token). (The labels are shifted rather than the logits, so no
  [B, T-1, V] copy.)
  """
  b = labels.shape[0]
  targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE, labels.dtype)], axis=1)
  weights = (targets != IGNORE).astype(jnp.float32)
  if attention_mask is not None:
    seg = attention_mask.astype(jnp.int32)
    nxt = jnp.concatenate([seg[:, 1:], jnp.zeros((b, 1), jnp.int32)], 1)
    weights = weights * ((nxt == seg) & (seg != 0)).astype(jnp.float32)
  return jnp.where(targets == IGNORE, 0, targets), weights


def _cross_entropy(logits, targets):
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return nll, jnp.argmax(logits, axis=-1) == targets


def token_loss(logits, labels, attention_mask=None):
  """Next-token cross-entropy on positions whose label is not IGNORE.

  Args: logits float32[B, T, V]; labels, attention_mask: as ``next_token_targets``.
  Returns: (nll float32[B, T], weights float32[B, T], correct bool[B, T]), aligned with
  the logits (see ``next_token_targets``).
  """
  targets, weights = next_token_targets(labels, attention_mask)
  nll, correct = _cross_entropy(logits, targets)
  return nll, weights, correct


def target_positions(weights, k: int):
  """int32[B, k]: each row's positions with weight > 0 first (in order), then others."""
  return jnp.argsort(weights <= 0, axis=1, stable=True)[:, :k].astype(jnp.int32)


def sparse_token_loss(head: Callable, hidden, labels, attention_mask, k: int):
  """``token_loss`` computing the head only where it is needed.

  Args: head: float[B, N, E] -> float32[B, N, V] logits; hidden float[B, T, E]; labels,
  attention_mask as ``next_token_targets``; k: head positions per row.
  Returns: as ``token_loss``. If every row has at most k targets, the head runs on
  [B, k] gathered positions; otherwise (checked on device) on all [B, T].
  """
  targets, weights = next_token_targets(labels, attention_mask)
  b, t = targets.shape

  def gathered(hidden):
    pos = target_positions(weights, k)
    nll_k, correct_k = _cross_entropy(
        head(jnp.take_along_axis(hidden, pos[..., None], axis=1)), jnp.take_along_axis(targets, pos, axis=1)
    )
    rows = jnp.arange(b)[:, None]
    return (
        jnp.zeros((b, t), jnp.float32).at[rows, pos].set(nll_k),
        jnp.zeros((b, t), bool).at[rows, pos].set(correct_k),
    )

  def full(hidden):
    return _cross_entropy(head(hidden), targets)

  fits = jnp.max(jnp.sum(weights > 0, axis=1)) <= k
  nll, correct = jax.lax.cond(fits, gathered, full, hidden)
  return nll, weights, correct


def per_example_sums(x, attention_mask):
  """float[B, T] -> float[B, T + 1]: sums of x over each segment of each row (column
  s = segment id s; column 0 = padding). Unpacked rows have one segment, id 1."""
  b, t = x.shape
  seg = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
  return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=t + 1))(x, seg)


def loss_fn(params, batch, cfg: LlavaConfig, step_cfg: StepConfig):
  """Returns (loss, aux) with aux sums for exact aggregation across microbatches.

  "examples" and the per-example mean (``loss_norm="example"``) count each example of
  a packed row on its own.
  """
  model_batch = {k: batch[k] for k in model_keys(cfg, videos=True) if k in batch}
  mask = model_batch.get("attention_mask")
  model = Llava(cfg)
  out = apply_model(model, params, model_batch, hidden_only=step_cfg.target_fraction is not None)
  if step_cfg.target_fraction is None:
    nll, w, correct = token_loss(out, model_batch["labels"], mask)
  else:
    k = max(1, math.ceil(step_cfg.target_fraction * out.shape[1]))
    head = lambda h: model.apply({"params": params}, h, method=Llava.head)
    nll, w, correct = sparse_token_loss(head, out, model_batch["labels"], mask, min(k, out.shape[1]))
  tokens = jnp.sum(w)
  per_example = per_example_sums(w, mask)
  example_nll = per_example_sums(nll * w, mask)
  aux = {
      "nll_sum": jnp.sum(nll * w),
      "tokens": tokens,
      "correct": jnp.sum(correct * w),
      "example_loss_sum": jnp.sum(example_nll / jnp.maximum(per_example, 1.0)),
      "examples": jnp.sum(per_example > 0).astype(jnp.float32),
  }
  return _normalised(aux, step_cfg), aux


def _normalised(aux, step_cfg: StepConfig):
  if step_cfg.loss_norm == "token":
    return aux["nll_sum"] / jnp.maximum(aux["tokens"], 1.0)
  if step_cfg.loss_norm == "example":
    return aux["example_loss_sum"] / jnp.maximum(aux["examples"], 1.0)
  raise ValueError(f"loss_norm {step_cfg.loss_norm!r}: expected 'token' or 'example'")


def make_train_step(
    cfg: LlavaConfig, optimizer: optax.GradientTransformation, trainable: Any, step_cfg: StepConfig = StepConfig()
) -> Callable:
  """Builds the pure ``train_step(state, batch) -> (state, metrics)``.

  ``trainable`` is a bool tree over params; frozen leaves go through ``stop_gradient``.
  With ``grad_accum = k`` the batch is split into k microbatches along B and summed
  statistics give exactly the same loss normalisation as one big batch.
  """

  def freeze(params):
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)

  def sums_and_grads(params, batch):
    def raw(p):  # un-normalised sums: normalise once over all microbatches
      _, aux = loss_fn(freeze(p), batch, cfg, step_cfg)
      key = "nll_sum" if step_cfg.loss_norm == "token" else "example_loss_sum"
      return aux[key], aux

    return jax.grad(raw, has_aux=True)(params)

  def train_step(state: TrainState, batch):
    k = step_cfg.grad_accum
    if k == 1:
      grads, aux = sums_and_grads(state.params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

      def body(carry, mb):
        g_acc, a_acc = carry
        g, a = sums_and_grads(state.params, mb)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        a_acc = a if a_acc is None else jax.tree.map(jnp.add, a_acc, a)
        return (g_acc, a_acc), None

      first_g, first_a = sums_and_grads(state.params, jax.tree.map(lambda x: x[0], micro))
      (grads, aux), _ = jax.lax.scan(body, (first_g, first_a), jax.tree.map(lambda x: x[1:], micro))
    denom = jnp.maximum(aux["tokens"] if step_cfg.loss_norm == "token" else aux["examples"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss, grad_norm = _normalised(aux, step_cfg), optax.global_norm(grads)
    # A non-finite loss or gradient never reaches the state: the update is dropped (the
    # step still counts, so the data and schedule move on) and reported as `nonfinite`;
    # the loop stops the run or counts it (train.on_nonfinite). With finite values the
    # selects return the updated state bit for bit.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {
        "loss": loss,
        "token_accuracy": aux["correct"] / jnp.maximum(aux["tokens"], 1.0),
        "target_tokens": aux["tokens"],
        "examples_with_targets": aux["examples"],
        "grad_norm": grad_norm,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    return (
        state.replace(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state)
        ),
        metrics,
    )

  return train_step


def make_eval_step(cfg: LlavaConfig, step_cfg: StepConfig = StepConfig()) -> Callable:
  """``eval_step(params, batch) -> {"loss", "tokens"}`` (teacher-forced loss)."""

  def eval_step(params, batch):
    loss, aux = loss_fn(params, batch, cfg, step_cfg)
    return {"loss": loss, "tokens": aux["tokens"]}

  return eval_step


def init_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=jax.random.key_data(rng)
  )
