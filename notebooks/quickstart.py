# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # llava_jax quickstart: train a tiny LLaVA, then ask it about an image
#
# A LLaVA-style model is a vision encoder (ViT) → a projector → a decoder LLM. This notebook
# trains a tiny one on the embedded synthetic *shapes* dataset (coloured circles, squares and
# triangles), through the same `llava_jax.train` loop that a TPU pod runs:
#
# 1. write the dataset: images, LLaVA-format JSON conversations and a sentencepiece tokenizer;
# 2. stage 1: captions (template `plain`);
# 3. stage 2: multi-turn VQA (template `vicuna_v1`), starting from stage 1. No pretrained
#    tower or LLM is available here, so both stages train every parameter;
# 4. plot the training loss from `metrics.jsonl`;
# 5. load the trained model, answer questions about a held-out image by greedy generation,
#    and score all 600 held-out questions.
#
# **What to expect:** this notebook shows how to use the API; it is not the full training
# recipe. With the default `STEPS = 200` per stage (a few minutes on a 2-core CPU) the
# model answers only part of the held-out questions correctly, and with a handful of
# steps its answers are useless. The full recipe trains 600 + 1200 steps (under 10
# minutes on a 2-core CPU) and passes 90% (see the README for the measured curve):
# `python -m llava_jax.demo` (or `bash launch/demo.sh`). Raise `STEPS` to get closer to it.

# %% tags=["parameters"]
import os

STEPS = int(os.environ.get("QUICKSTART_STEPS", "200"))  # training steps per stage (recipe: 600, 1200)
ROOT = os.path.abspath(os.environ.get("QUICKSTART_ROOT", "runs/quickstart"))  # data, checkpoints, logs

# %% [markdown]
# ## Setup
#
# On Colab, the next cell clones the repository and installs it. First, set `REPO_URL` to
# your copy. Anywhere else, the cell does nothing: run the notebook from a checkout where
# `llava_jax` is installed (`bash launch/setup.sh` creates `.venv`).

# %%
import subprocess
import sys

try:
  import google.colab  # noqa: F401  (importable only on Colab)
  IN_COLAB = True
except ImportError:
  IN_COLAB = False

if IN_COLAB:
  REPO_URL = "https://github.com/YOUR-ORG/llava_jax.git"  # edit: your copy of this repository
  if not os.path.exists("/content/llava_jax"):
    subprocess.run(["git", "clone", "-q", REPO_URL, "/content/llava_jax"], check=True)
  os.chdir("/content/llava_jax")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "."], check=True)
  sys.path.insert(0, "/content/llava_jax")  # a running kernel does not see new editable installs

# %% [markdown]
# ## The dataset
#
# `configs/tiny_shapes.py` is an ordinary `get_config(arg)` file (`"stage1,root=DIR"`);
# `llava_jax.demo.load_config` loads it exactly as `--config=configs/tiny_shapes.py:stage1,root=DIR`
# would. Its `data.synthetic` block says how to generate the dataset.

# %%
import json

from llava_jax.demo import load_config
from llava_jax.train.loop import prepare_synthetic

configs = {stage: load_config(stage, ROOT) for stage in ("stage1", "stage2")}
prepare_synthetic(configs["stage1"])  # writes it unless already there (train() does the same)
for stage, config in configs.items():
  with open(config.data.train) as f:
    print(f"{stage}: {json.loads(f.readline())}")

# %% [markdown]
# ## Train stage 1 (captions), then stage 2 (VQA)
#
# Stage 2's config starts from the stage-1 checkpoint (`init.from_run`). Running this cell
# again resumes from the last checkpoint, so a finished stage is not trained again. To start
# over, delete `ROOT`. The model has 0.8M parameters; the batch of 32 is split over all
# local devices.

# %%
import time

from llava_jax.train.loop import train

for stage, config in configs.items():
  config.train.update(steps=STEPS, ckpt_every=STEPS, log_every=max(1, STEPS // 40),
                      eval_every=0, tensorboard=False)
  print(f"== {stage}: {STEPS} steps of {config.data.train} (template {config.data.template!r})")
  t0 = time.time()
  last = train(config, os.path.join(ROOT, stage))  # the last logged metrics; {} if already done
  print(f"   {time.time() - t0:.0f} s, " + (f"loss {last['loss']:.3f}" if last else "already trained"))

# %% [markdown]
# ## The training curve
#
# `DIR/metrics.jsonl` has one JSON object per logged step (`loss`, `lr`, `token_accuracy`,
# `tokens_per_s`, `mfu`, skip counters, …).

# %%
def read_losses(workdir: str) -> dict[int, float]:
  """step -> loss (the last value logged for a step: a resumed run logs some again)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


losses = {stage: read_losses(os.path.join(ROOT, stage)) for stage in configs}
for stage, curve in losses.items():
  print(f"{stage} loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in sorted(curve.items())))

try:
  import matplotlib.pyplot as plt
except ImportError:  # the printed curve above is enough
  plt = None
if plt is not None:
  fig, axes = plt.subplots(1, 2, figsize=(9, 3))
  for ax, (stage, curve) in zip(axes, losses.items()):
    ax.plot(sorted(curve), [curve[s] for s in sorted(curve)])
    ax.set(title=stage, xlabel="step", ylabel="training loss per token", yscale="log")
  fig.tight_layout()
  plt.show()

# %% [markdown]
# ## Ask the trained model about a held-out image
#
# `load_model` reads a training workdir (`run.json` records the tokenizer, template and image
# preprocessing) or a Hugging Face / original LLaVA directory. `model.answer` renders the
# conversation with the template (`encode_prompt`: one placeholder id per image feature),
# preprocesses the image, then `sampler.generate` prefills a KV cache and decodes greedily.
# Held-out images show shape/colour/position combinations that never appear in training.

# %%
from llava_jax.data.images import load_image
from llava_jax.eval.tasks import SHORT_ANSWER
from llava_jax.infer.loading import load_model

model = load_model(os.path.join(ROOT, "stage2"))
print(f"loaded step {model.step}, template {model.template!r}, "
      f"{model.cfg.num_image_tokens} image tokens per image")


def ask(image, question: str, max_new_tokens: int = 8) -> str:
  """Greedy answer to one question about one image (a PIL image)."""
  conversation = [{"from": "human", "value": f"<image>\n{question}\n{SHORT_ANSWER}"}]
  return model.answer(conversation, image, max_new_tokens=max_new_tokens)


data = configs["stage2"].data
with open(data.eval_questions) as f:
  question = json.loads(f.readline())
with open(data.eval_annotations) as f:
  truth = next(r["answer"] for r in map(json.loads, f) if r["question_id"] == question["question_id"])
image = load_image(os.path.join(data.image_root, question["image"]))
if plt is not None:
  plt.figure(figsize=(2, 2))
  plt.imshow(image)
  plt.axis("off")
  plt.show()
text = question["text"].splitlines()[0]  # the question without the short-answer instruction
print(f"image {question['image']}\nQ: {text}\nA: {ask(image, text)}   (ground truth: {truth})")

# %% [markdown]
# Ask your own questions about the same image. The model knows the question forms of the
# dataset: "What color is the circle?", "What shape is red?", "Where is the square?",
# "How many shapes are there?", "Is there a triangle?".

# %%
for q in ("How many shapes are there?", "Is there a circle?"):
  print(f"Q: {q}\nA: {ask(image, q)}")

# %% [markdown]
# ## Held-out accuracy
#
# `run_eval` answers every held-out question by greedy generation and scores exact match (as
# `python -m llava_jax.evaluate --task=synthetic` does). The answers go in `ROOT/eval/step<N>`.
# If that directory already exists, `run_eval` reuses the answers saved there.

# %%
from llava_jax.eval.run import run_eval

metrics = run_eval(model, os.path.join(ROOT, "eval", f"step{model.step}"), task="synthetic",
                   questions=data.eval_questions, annotations=data.eval_annotations,
                   image_root=data.image_root, batch_size=50, max_new_tokens=8, progress=False)
print(f"held-out VQA exact match at stage-2 step {model.step}: "
      f"{metrics['synthetic/accuracy']:.1%} of {metrics['synthetic/n']} questions")

# %% [markdown]
# ## Next steps
#
# - The full recipe, with held-out accuracy by greedy generation: `python -m llava_jax.demo`.
# - The same training from the command line:
#   `python -m llava_jax.train --config=configs/tiny_shapes.py:stage1,root=runs/shapes --workdir=runs/shapes/stage1`
#   (any field can be overridden with `--config.train.steps=...`).
# - Answers from the command line:
#   `python -m llava_jax.generate --checkpoint=DIR --image=PATH --prompt=TEXT`.
# - Real checkpoints: `llava_jax.checkpoint.convert.hf.load_hf_llava` and `load_model` load
#   Hugging Face LLaVA directories; `configs/llava15_stage{1,2}.py` contain the LLaVA-1.5 recipe.
