"""Test set-up: 8 fake CPU devices so real meshes are exercised, float32 matmuls at full precision."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # shared fixtures such as tiny_hf.py

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A local GCS emulator (``tests/gcs_emulator.py``) for the whole session; this process
  and the subprocesses it starts talk to it (``gs://`` paths), never to the network."""
  from gcs_emulator import GcsEmulator

  saved = dict(os.environ)
  emulator = GcsEmulator()
  emulator.env["LLAVA_JAX_CACHE"] = str(tmp_path_factory.mktemp("llava_jax_cache"))
  with emulator:
    emulator.configure_this_process()
    yield emulator
  os.environ.clear()
  os.environ.update(saved)


@pytest.fixture
def bucket(gcs):
  """A fresh, empty bucket: ``gs://<name>``."""
  import uuid

  name = f"test-{uuid.uuid4().hex[:12]}"
  gcs.create_bucket(name)
  return f"gs://{name}"
