"""Train step: loss decreases, freezing is exact, sharded == unsharded, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax import sharding
from llava_jax.models import LLM_VARIANTS, VISION_VARIANTS, llava_config
from llava_jax.train import optim, state as state_lib
from llava_jax.train.step import IGNORE, StepConfig, make_train_step

STAGE1 = ((r"projector/.*", 1.0),)
STAGE2 = ((r"projector/.*", 1.0), (r"llm/.*", 0.5))
grad_norms: list[float] = []  # per step of the last run()


def tiny_cfg(scan=True):
  llm = dataclasses.replace(LLM_VARIANTS["tiny"], scan=scan, remat="full" if scan else "none")
  return llava_config(VISION_VARIANTS["clip-tiny"], llm)


def make_batch(cfg, b=8, t=40, seed=0):
  """Each row: bos, image, a few prompt tokens, a 5-token answer (the only labels), pad."""
  rng = np.random.default_rng(seed)
  n = cfg.num_image_tokens
  ids = np.zeros((b, t), np.int32)
  labels = np.full((b, t), IGNORE, np.int32)
  mask = np.zeros((b, t), np.int32)
  image_mask = np.zeros((b, 1), bool)
  for i in range(b):
    has_image = i % 4 != 3  # every 4th row is text-only
    row = [1] + ([cfg.image_token_id] * n if has_image else []) + list(rng.integers(3, 50, 4))
    answer = [int(x) for x in (np.arange(5) + 60 + (i % 3))]
    full = row + answer
    ids[i, : len(full)], mask[i, : len(full)] = full, 1
    labels[i, len(row) : len(full)] = answer
    image_mask[i, 0] = has_image
  px = rng.normal(size=(b, 1, 28, 28, 3)).astype(np.float32)
  return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px, "image_mask": image_mask}


def run(cfg, rules, steps, mesh_shape=(1, 1, 1), step_cfg=StepConfig(), batch=None, lr=3e-3):
  del grad_norms[:]
  ocfg = optim.OptimConfig(learning_rate=lr, total_steps=steps, warmup_ratio=0.0, lr_rules=rules)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
  params = state_lib.init_params(cfg, jax.random.key(0))
  opt = optim.make_optimizer(ocfg, params)
  state, shardings = state_lib.create_state(cfg, opt, mesh, jax.random.key(1), params=params)
  batch = batch or make_batch(cfg)
  step = state_lib.jit_train_step(
      make_train_step(cfg, opt, optim.trainable_mask(params, ocfg), step_cfg), shardings, mesh, batch
  )
  losses = []
  with sharding.use_mesh(mesh):
    for _ in range(steps):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
  return params, state, losses


def test_loss_decreases_stage2():
  _, _, losses = run(tiny_cfg(), STAGE2, 12)
  assert losses[-1] < 0.5 * losses[0], losses


def test_stage1_freezes_everything_but_projector():
  cfg = tiny_cfg()
  params, state, losses = run(cfg, STAGE1, 3)
  new = jax.tree.map(np.asarray, state.params)
  for group in ("img", "llm"):
    jax.tree.map(np.testing.assert_array_equal, new[group], params[group])  # bit-identical
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), new["projector"], params["projector"]))
  assert all(changed)
  # Frozen params get no optimizer state: only projector-sized buffers (mu, nu) exist.
  n_proj = sum(a.size for a in jax.tree.leaves(params["projector"]))
  n_state = sum(a.size for a in jax.tree.leaves(state.opt_state) if a.ndim > 0)
  assert n_state == 2 * n_proj, (n_state, n_proj)


def test_sharded_matches_single_device():
  cfg = tiny_cfg()
  _, _, single = run(cfg, STAGE2, 3, (1, 1, 1))
  single_gn = list(grad_norms)
  _, s8, sharded = run(cfg, STAGE2, 3, (2, 2, 2))
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  np.testing.assert_allclose(grad_norms, single_gn, rtol=1e-5)
  # (Params after Adam are not compared elementwise: for ~0 gradients Adam's update is
  # ~lr * sign(g), so float-level gradient noise flips it; loss and grad norm are the test.)
  leaf = s8.params["llm"]["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert len(leaf.sharding.device_set) == 8 and leaf.sharding.spec != jax.sharding.PartitionSpec()


def test_grad_accumulation_equals_one_big_batch():
  cfg = tiny_cfg(scan=False)
  _, _, l1 = run(cfg, STAGE2, 2)
  g1 = list(grad_norms)
  _, _, l2 = run(cfg, STAGE2, 2, step_cfg=StepConfig(grad_accum=2))
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  np.testing.assert_allclose(grad_norms, g1, rtol=1e-5)


def test_example_normalisation_differs_from_token_when_lengths_differ():
  cfg = tiny_cfg(scan=False)
  batch = make_batch(cfg)
  batch["labels"][0, :] = np.where(batch["attention_mask"][0] == 1, batch["input_ids"][0], IGNORE)
  batch["labels"][0, 0] = IGNORE
  _, _, tok = run(cfg, STAGE2, 1, batch=batch)
  _, _, ex = run(cfg, STAGE2, 1, batch=batch, step_cfg=StepConfig(loss_norm="example"))
  assert abs(tok[0] - ex[0]) > 1e-3


def test_no_trainable_params_is_a_clear_error():
  cfg = tiny_cfg()
  params = state_lib.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="no trainable params"):
    optim.make_optimizer(optim.OptimConfig(lr_rules=((r"vision/.*", 1.0),)), params)


def test_bf16_compute_keeps_float32_master_params():
  cfg = tiny_cfg()
  cfg = dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, dtype="bfloat16"), llm=dataclasses.replace(cfg.llm, dtype="bfloat16")
  )
  _, state, losses = run(cfg, STAGE2, 8)
  assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}


def test_schedule_warmup_then_cosine():
  c = optim.OptimConfig(learning_rate=1.0, warmup_ratio=0.1, final_lr_ratio=0.1, total_steps=100)
  s = optim.schedule(c)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(100)) == pytest.approx(0.1)
  assert float(s(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-4)  # half-way down the cosine


def test_model_flops_match_6nt_for_a_plain_decoder():
  """The analytic count reduces to the textbook 6 * params * tokens (+ attention)."""
  from llava_jax.train.flops import llm_forward_flops_per_token

  c = LLM_VARIANTS["vicuna-7b"]
  n_matmul = c.num_layers * (4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size)
  n_matmul += c.hidden_size * c.vocab_size
  per_token = llm_forward_flops_per_token(c, context=0)
  assert per_token == 2 * n_matmul
  assert llm_forward_flops_per_token(c, context=1024) - per_token == 32 * 2 * 2 * 4096 * 1024


def pack_by_hand(batch, per_row: int, t: int):
  """Rows of ``batch`` concatenated ``per_row`` at a time into rows of ``t`` tokens
  (segment ids 1.., positions restarting per example, images in token order)."""
  b = batch["input_ids"].shape[0]
  rows = b // per_row
  out = {
      "input_ids": np.zeros((rows, t), np.int32),
      "labels": np.full((rows, t), IGNORE, np.int32),
      "attention_mask": np.zeros((rows, t), np.int32),
      "positions": np.zeros((rows, t), np.int32),
      "pixel_values": np.zeros((rows, per_row) + batch["pixel_values"].shape[2:], np.float32),
      "image_mask": np.zeros((rows, per_row), bool),
  }
  for r in range(rows):
    at = slots = 0
    for k in range(per_row):
      i = r * per_row + k
      n = int(batch["attention_mask"][i].sum())
      for key in ("input_ids", "labels"):
        out[key][r, at : at + n] = batch[key][i, :n]
      out["attention_mask"][r, at : at + n] = k + 1
      out["positions"][r, at : at + n] = np.arange(n)
      at += n
      if batch["image_mask"][i, 0]:
        out["pixel_values"][r, slots] = batch["pixel_values"][i, 0]
        out["image_mask"][r, slots] = True
        slots += 1
    assert at <= t
  return out


@pytest.mark.parametrize("loss_norm", ["token", "example"])
def test_packed_rows_train_exactly_like_separate_rows(loss_norm):
  """A packed row (segment ids, restarting positions) gives the loss, statistics and
  gradients of its examples in separate rows: no attention, position or loss term
  crosses an example boundary."""
  from llava_jax.train.step import loss_fn

  cfg = tiny_cfg(scan=False)
  params = state_lib.init_params(cfg, jax.random.key(0))
  flat = make_batch(cfg, b=8, t=40)
  packed = pack_by_hand(flat, per_row=4, t=160)
  assert packed["input_ids"].shape == (2, 160) and packed["attention_mask"].max() == 4
  step_cfg = StepConfig(loss_norm=loss_norm)
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, cfg, step_cfg), has_aux=True))
  g_flat, aux_flat = grad(params, flat)
  g_packed, aux_packed = grad(params, packed)
  for k in aux_flat:
    np.testing.assert_allclose(aux_packed[k], aux_flat[k], rtol=1e-5, err_msg=k)
  assert float(aux_packed["examples"]) == 8.0
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_flat))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale), g_packed, g_flat)


def test_packed_row_without_segment_ids_differs():
  """The check above can fail: the same packed row with one segment per row (examples
  attend to, and the loss crosses into, the examples before them) changes the loss.
  (Positions alone would not show it: RoPE scores depend only on position differences.)"""
  from llava_jax.train.step import loss_fn

  cfg = tiny_cfg(scan=False)
  params = state_lib.init_params(cfg, jax.random.key(0))
  packed = pack_by_hand(make_batch(cfg, b=8, t=40), per_row=4, t=160)
  wrong = dict(packed, attention_mask=(packed["attention_mask"] > 0).astype(np.int32))
  right_loss, _ = loss_fn(params, packed, cfg, StepConfig())
  wrong_loss, _ = loss_fn(params, wrong, cfg, StepConfig())
  assert abs(float(right_loss) - float(wrong_loss)) > 1e-3, (right_loss, wrong_loss)


@pytest.mark.parametrize("fraction", [0.25, 0.05])
def test_head_at_targets_only_gives_the_same_loss_and_grads(fraction):
  """target_fraction=0.25: 10 head positions per 40-token row, enough for the 5 answer
  tokens, so the head runs on gathered positions; 0.05: 2 < 5, so it falls back to the
  full head. Both equal the plain step."""
  from llava_jax.train.step import loss_fn

  cfg = tiny_cfg(scan=False)
  params = state_lib.init_params(cfg, jax.random.key(0))
  batch = pack_by_hand(make_batch(cfg, b=8, t=40), per_row=2, t=80)
  grad = lambda sc: jax.jit(jax.grad(lambda p, b: loss_fn(p, b, cfg, sc), has_aux=True))(params, batch)
  g_full, aux_full = grad(StepConfig())
  g_sparse, aux_sparse = grad(StepConfig(target_fraction=fraction))
  for k in aux_full:
    np.testing.assert_allclose(aux_sparse[k], aux_full[k], rtol=1e-5, err_msg=k)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_full))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale), g_sparse, g_full)


def test_gathered_head_runs_when_the_targets_fit_and_full_head_otherwise():
  """A head that marks its full-length calls (+50 on class 0) shows which branch ran."""
  from llava_jax.train.step import sparse_token_loss, target_positions, token_loss

  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 12, 4)), jnp.float32)
  w_out = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
  labels = np.full((2, 12), IGNORE, np.int32)
  labels[0, 3:6], labels[1, 8:11] = [1, 2, 3], [4, 5, 6]
  marker = jnp.zeros((7,)).at[0].set(50.0)
  head = lambda h: h @ w_out + (marker if h.shape[1] == 12 else 0.0)
  ref_nll, ref_w, ref_correct = token_loss(hidden @ w_out, labels)
  targets_per_row = int(np.max(np.sum(np.asarray(ref_w) > 0, axis=1)))
  assert targets_per_row == 3  # labels at 3..5 are targets of positions 2..4
  np.testing.assert_array_equal(target_positions(ref_w, 3), [[2, 3, 4], [7, 8, 9]])

  nll, w, correct = sparse_token_loss(head, hidden, labels, None, 3)  # fits: gathered
  np.testing.assert_array_equal(w, ref_w)
  np.testing.assert_allclose(nll * w, ref_nll * ref_w, rtol=1e-6)
  np.testing.assert_array_equal(correct & (w > 0), ref_correct & (ref_w > 0))
  nll2, _, _ = sparse_token_loss(head, hidden, labels, None, 2)  # does not fit: full head
  assert float(jnp.sum(nll2 * w)) > float(jnp.sum(ref_nll * ref_w)) + 10


def test_target_fraction_is_checked():
  with pytest.raises(ValueError, match="target_fraction"):
    StepConfig(target_fraction=0.0)
