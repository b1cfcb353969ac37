r"""Evaluate a checkpoint on a benchmark's question file; answers JSONL + eval.json.

  python -m llava_jax.evaluate --checkpoint=DIR --task=gqa --workdir=OUT \
      --questions=llava_gqa_testdev_balanced.jsonl --annotations=testdev_balanced_questions.json \
      --image_root=gqa/images [--batch_size=8] [--limit=N]

DIR is a training workdir, a HF LLaVA or an original LLaVA directory
(``llava_jax.infer.loading.load_model``). Re-running with the same OUT resumes: answered
question ids are skipped. For the embedded shapes task, ``--task=synthetic`` with the
``eval_questions.jsonl`` / ``eval_annotations.jsonl`` that ``llava_jax.data.synthetic``
writes (images are found next to the question file unless ``--image_root`` says).

Several processes (a TPU pod's hosts, or ``launch/local_pod.sh`` on one machine):

  bash launch/local_pod.sh 2 llava_jax.evaluate --checkpoint=DIR --task=synthetic --workdir=OUT ...

joins the job first (``llava_jax.distributed``), puts the params sharded on a mesh of
all devices (``--mesh``), answers every question once and writes OUT from process 0
only (``llava_jax.eval.run``). Every process needs the checkpoint, question and image
files; only process 0 needs OUT.

The command is also ``python -m llava_jax.eval``; the code lives here, beside the package it drives.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from llava_jax import distributed
from llava_jax.eval.tasks import TASKS

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint directory", required=True)
_TASK = flags.DEFINE_enum("task", None, sorted(TASKS), "benchmark (prompt suffix + metric)", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory", required=True)
_QUESTIONS = flags.DEFINE_string("questions", None, "question file (.jsonl/.json/.tsv)", required=True)
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "ground truth; omit to only answer")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "images dir (default: next to questions)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "questions per generate call")
_LIMIT = flags.DEFINE_integer("limit", None, "only the first N questions")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "answer length limit")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_VIDEO_FRAMES = flags.DEFINE_integer("video_frames", 8, "frames sampled uniformly from each question's video")
_TEMPLATE = flags.DEFINE_string("template", None, "override the conversation template")
_STEP = flags.DEFINE_integer("step", None, "training workdirs: checkpoint step (default latest)")
_MESH = flags.DEFINE_string(
    "mesh",
    "-1,1,1",
    "data,fsdp,tensor mesh over all devices of all processes (-1: the rest); e.g. 1,-1,1 shards params FSDP-style",
)


def main(argv):
  del argv
  distributed.initialize()
  from llava_jax import sharding, storage
  from llava_jax.eval.run import run_eval

  try:  # an unusable path scheme (local and gs:// work): refused before loading anything
    storage.check(_WORKDIR.value, "--workdir", write=True)
    for flag in (_CHECKPOINT, _QUESTIONS, _ANNOTATIONS, _IMAGE_ROOT):
      if flag.value:
        storage.check(flag.value, f"--{flag.name}")
  except storage.UnsupportedPathError as e:
    raise app.UsageError(str(e)) from e
  from llava_jax.infer.loading import load_model, parse_mesh_shape

  try:
    mesh = sharding.make_mesh(parse_mesh_shape(_MESH.value))
  except ValueError as e:
    raise app.UsageError(f"--mesh: {e}") from e
  model = load_model(_CHECKPOINT.value, template=_TEMPLATE.value, step=_STEP.value, mesh=mesh)
  logging.info(
      "loaded %s (%s, template %s, step %s) on mesh %s",
      _CHECKPOINT.value,
      model.source,
      model.template,
      model.step,
      dict(mesh.shape),
  )
  result = run_eval(
      model,
      _WORKDIR.value,
      task=_TASK.value,
      questions=_QUESTIONS.value,
      annotations=_ANNOTATIONS.value,
      image_root=_IMAGE_ROOT.value,
      batch_size=_BATCH.value,
      limit=_LIMIT.value,
      max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value,
      seed=_SEED.value,
      model_id=os.path.basename(os.path.normpath(_CHECKPOINT.value)),
      video_frames=_VIDEO_FRAMES.value,
  )
  if distributed.is_primary():
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
