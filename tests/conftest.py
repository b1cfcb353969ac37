"""Test set-up: 8 fake CPU devices so real meshes are exercised, float32 matmuls at full precision."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # shared fixtures such as tiny_hf.py

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
