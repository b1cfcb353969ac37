"""Stage 2 starts from a stage-1 run's projector plus converted HF LLM/ViT weights."""

import jax
import numpy as np
import pytest

import tiny_hf
from llava_jax.checkpoint import orbax as ckpt
from llava_jax.checkpoint.convert.hf import (llm_config_from_hf, load_hf_llm, load_hf_vision, vision_config_from_hf)
from llava_jax.models import init_params, llava_config
from llava_jax import sharding
from llava_jax.train import optim, state as state_lib
from llava_jax.train import run_config
from llava_jax.train.loop import initial_params, place_params


def test_initial_params_from_stage1_run_and_hf_towers(tmp_path):
  import transformers as tf

  vision_dir, llm_dir, run_dir = tmp_path / "clip", tmp_path / "llama", str(tmp_path / "stage1")
  tiny_hf.randomize_(tf.CLIPVisionModel(tiny_hf.clip_vision_config()), seed=1).save_pretrained(vision_dir)
  tiny_hf.causal_lm("llama", seed=2).save_pretrained(llm_dir)
  v = vision_config_from_hf(tiny_hf.clip_vision_config().to_dict(), select_layer=-2, select_feature="patch", scan=True)
  l = llm_config_from_hf(tiny_hf.text_config("llama").to_dict(), tie_embeddings=False)
  cfg = llava_config(v, l, image_token_id=l.vocab_size - 1)

  # A "stage-1 run": random params whose projector we can recognise, saved by the Checkpointer.
  stage1 = init_params(cfg, jax.random.key(7))
  ocfg = optim.OptimConfig(lr_rules=((r"projector/.*", 1.0),))
  opt = optim.make_optimizer(ocfg, stage1)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  state, _ = state_lib.create_state(cfg, opt, mesh, jax.random.key(0), params=stage1)
  saver = ckpt.Checkpointer(run_dir, every=1)
  saver.save(1, state, force=True)
  saver.close()

  init = run_config.InitOptions(
      vision_hf=str(vision_dir), llm_hf=str(llm_dir), from_run=run_dir, from_run_params=r"projector/.*"
  )
  fresh, shardings = state_lib.create_state(cfg, opt, mesh, jax.random.key(3))
  overrides = initial_params(init, cfg, shardings.params)
  assert all(n.startswith(("img/", "llm/", "projector/")) for n in overrides)
  params = place_params(fresh.params, overrides)
  jax.tree.map(np.testing.assert_array_equal, params["projector"], jax.tree.map(np.asarray, stage1["projector"]))
  _, img = load_hf_vision(str(vision_dir), select_layer=-2, select_feature="patch", scan=True)
  _, llm = load_hf_llm(str(llm_dir))
  jax.tree.map(np.testing.assert_array_equal, params["img"], img)
  jax.tree.map(np.testing.assert_array_equal, params["llm"], llm)
  leaf = params["llm"]["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert leaf.sharding == fresh.params["llm"]["decoder"]["layers"]["mlp"]["up_proj"]["kernel"].sharding
  with pytest.raises(KeyError, match="llm/nonexistent"):
    place_params(fresh.params, {"llm/nonexistent": np.zeros(3)})
  bad = {"projector/linear_1/bias": np.zeros(3)}
  with pytest.raises(ValueError, match="projector/linear_1/bias: shape"):
    place_params(fresh.params, bad)
