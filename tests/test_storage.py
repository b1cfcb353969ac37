"""``llava_jax.storage`` and the workdir files on a bucket, against the local GCS emulator
(``tests/gcs_emulator.py``, which honours generation preconditions as GCS does).

- unsupported schemes are refused by name, with the reason, before any work;
- whole-file writes, create-only / compare-and-swap / conditional delete, appends that
  publish whole lines and detect a second writer;
- the run lock on gs://: a live holder refused, two racing trainers: exactly one wins, a
  dead or silent holder taken over, released only by its holder;
- metrics.jsonl / eval.json / answer files / the run's log on gs://;
- ``save_hf_llava`` / ``load_hf_llava`` to and from the bucket.
"""

import json
import os
import threading

import numpy as np
import pytest

from llava_jax import storage
from llava_jax.checkpoint import lock as lock_lib


def test_unsupported_schemes_are_refused_with_the_reason():
  for path in ("ftp://host/x", "http://host/x", "memory://x"):
    with pytest.raises(storage.UnsupportedPathError, match=r"not supported; supported: local paths and gs://"):
      storage.check(path, "--workdir")
  with pytest.raises(storage.UnsupportedPathError, match="plain local path"):
    storage.check("file:///tmp/x", "--workdir")
  with pytest.raises(storage.UnsupportedPathError, match="inputs only.*conditional writes"):
    storage.check("s3://bucket/run", "--workdir", write=True)
  assert storage.check("/tmp/x", "--workdir", write=True) == "/tmp/x"
  assert storage.absolute("gs://b/run") == "gs://b/run"  # os.path.abspath would make $PWD/gs:/b/run
  assert storage.join("gs://b", "run", "metrics.jsonl") == "gs://b/run/metrics.jsonl"


def test_train_refuses_an_unusable_workdir_before_any_work(tmp_path, monkeypatch):
  import importlib.util
  from llava_jax.train import loop

  monkeypatch.chdir(tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("tiny_shapes", f"{root}/configs/tiny_shapes.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"test,root={tmp_path}/shapes")
  with config.unlocked():
    config.data.train = "gs://b/train.jsonl,ftp://h/x.jsonl"
  with pytest.raises(storage.UnsupportedPathError, match=r"config.data.train 'ftp://h/x.jsonl'"):
    loop.train(config, str(tmp_path / "run"))
  config.data.train = f"{tmp_path}/shapes/data/stage2.jsonl"
  with pytest.raises(storage.UnsupportedPathError, match=r"--workdir 'az://c/run': az:// is supported for inputs only"):
    loop.train(config, "az://c/run")
  assert os.listdir(tmp_path) == []  # nothing written: no dataset, no lock, no local 'az:' folder


def test_whole_file_writes_and_conditional_operations(bucket):
  path = f"{bucket}/run/eval.json"
  storage.write_json({"step": 1}, path)
  storage.write_json({"step": 2}, path)
  assert storage.read_json(path) == {"step": 2}
  assert storage.exists(path) and storage.isfile(path) and storage.isdir(f"{bucket}/run")
  assert storage.listdir(f"{bucket}/run") == ["eval.json"]
  assert storage.glob(f"{bucket}/run/*.json") == [path]

  lock = f"{bucket}/run/run.lock"
  first = storage.create_only(lock, b"a")
  assert first is not None and storage.create_only(lock, b"b") is None  # create-only
  second = storage.replace_if(lock, b"c", first)
  assert second and storage.replace_if(lock, b"d", first) is None  # stale generation refused
  assert storage.read_object(lock)[0] == b"c"
  assert not storage.delete_if(lock, first) and storage.exists(lock)
  assert storage.delete_if(lock, second) and not storage.exists(lock)


def test_appends_publish_whole_lines_and_detect_a_second_writer(bucket, monkeypatch):
  path = f"{bucket}/metrics.jsonl"
  monkeypatch.setattr(storage.Appender, "REUPLOAD_EVERY", 3)  # also the whole re-upload path
  writer = storage.Appender(path)
  for i in range(7):
    writer.append(json.dumps({"step": i}) + "\n")
    assert storage.read_bytes(path).count(b"\n") == i if i else not storage.exists(path)  # not yet
    writer.flush()
  assert [json.loads(line)["step"] for line in storage.read_text(path).splitlines()] == list(range(7))
  assert storage.listdir(bucket) == ["metrics.jsonl"]  # the appended parts are deleted
  other = storage.Appender(path)
  writer.append("x\n")
  writer.flush()
  other.append("y\n")
  with pytest.raises(storage.ConcurrentWriteError, match="another writer"):
    other.flush()
  assert storage.read_text(path).endswith("x\n")  # nothing of the stale writer


def test_local_copy_is_cached_by_generation(bucket):
  path = f"{bucket}/data/train.jsonl"
  storage.write_atomic(path, b'{"id": 1}\n')
  first = storage.local_copy(path)
  assert open(first, "rb").read() == b'{"id": 1}\n' and storage.local_copy(path) == first
  storage.write_atomic(path, b'{"id": 2}\n')
  second = storage.local_copy(path)
  assert second != first and open(second, "rb").read() == b'{"id": 2}\n'


def test_lock_on_a_bucket(bucket, monkeypatch):
  workdir = f"{bucket}/run"
  with lock_lib.WorkdirLock(workdir):
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"pid {os.getpid()}"):
      lock_lib.WorkdirLock(workdir).acquire()
  assert not storage.exists(f"{workdir}/{lock_lib.LOCK_FILE}")  # released

  # Two trainers racing for a free workdir: exactly one gets it.
  outcomes = []
  locks = [lock_lib.WorkdirLock(workdir) for _ in range(4)]
  start = threading.Barrier(len(locks))

  def take(lock):
    start.wait()
    try:
      lock.acquire()
      outcomes.append("held")
    except lock_lib.WorkdirLockedError:
      outcomes.append("refused")

  threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(outcomes) == ["held", "refused", "refused", "refused"]
  holder = next(lock for lock in locks if lock.held)

  # A holder on another host is stale once its heartbeat (the object's update time) is old.
  storage.replace_if(holder.path, json.dumps({"host": "some-other-host", "pid": 1}).encode(), holder._generation)
  with pytest.raises(lock_lib.WorkdirLockedError, match="some-other-host"):
    lock_lib.WorkdirLock(workdir).acquire()
  monkeypatch.setattr(lock_lib, "STALE_S", 0.0)
  taker = lock_lib.WorkdirLock(workdir).acquire()
  assert json.loads(storage.read_bytes(taker.path))["pid"] == os.getpid()
  holder.release()  # the old holder's generation is gone: it must not delete the new lock
  assert storage.exists(taker.path)
  taker.release()
  assert not storage.exists(taker.path)


def test_metric_writer_eval_json_and_resume_repair(bucket):
  from llava_jax.train.metrics import MetricWriter

  workdir = f"{bucket}/run"
  writer = MetricWriter(workdir, tensorboard=False)
  for step in range(1, 6):
    writer.write(step, {"loss": 1.0 / step})
  writer.write_eval(5, {"val_loss": 0.5})
  writer.close()
  assert storage.read_json(f"{workdir}/eval.json") == {"step": 5, "val_loss": 0.5}
  writer = MetricWriter(workdir, tensorboard=False, resume_step=3)  # resumed from step 3
  writer.write(4, {"loss": 0.25})
  writer.close()
  steps = [json.loads(line)["step"] for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert steps == [1, 2, 3, 4]


def test_answer_file_resumes_on_a_bucket(bucket):
  from llava_jax.eval.answers import AnswerWriter, answered_ids, read_answers

  path = f"{bucket}/eval/synthetic_answers.jsonl"
  with AnswerWriter(path, "m") as writer:
    writer.write("q0", "p", "red")
    writer.flush()
    writer.write("q1", "p", "two")  # published at close
  assert answered_ids(path) == {"q0", "q1"}
  storage.write_atomic(path, storage.read_bytes(path) + b'{"question_id": "q2", "te')  # a cut copy
  with pytest.warns(RuntimeWarning, match="truncated last line"):
    writer = AnswerWriter(path, "m")
  writer.write("q2", "p", "yes")
  writer.close()
  assert [r["question_id"] for r in read_answers(path)] == ["q0", "q1", "q2"]


def test_log_file_on_a_bucket(bucket, monkeypatch):
  import logging
  from llava_jax import console

  path = f"{bucket}/run/logs/process_0.log"
  handler = console.RemoteLogHandler(path)
  handler.setFormatter(logging.Formatter("%(message)s"))
  record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("bucket",), None)
  handler.emit(record)
  handler.close()
  assert storage.read_text(path) == "hello bucket\n"


def test_hf_llava_to_and_from_a_bucket(bucket):
  import jax
  from llava_jax.checkpoint.convert.hf import load_hf_llava, save_hf_llava
  from llava_jax.models.configs import llava_config
  from llava_jax.models.llava import init_params

  cfg = llava_config("clip-tiny", "tiny")
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # random values: fast
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  out = f"{bucket}/hf/tiny-llava"
  save_hf_llava(cfg, params, out, max_shard_bytes=200_000)  # sharded: several files and an index
  names = storage.listdir(out)
  assert "config.json" in names and "model.safetensors.index.json" in names
  assert not [n for n in names if n.endswith(".tmp")]
  loaded_cfg, loaded = load_hf_llava(out)
  assert loaded_cfg.llm.hidden_size == cfg.llm.hidden_size
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  want, got = flat(params), flat(loaded)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
