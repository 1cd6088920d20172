"""Test setup: every test sees 8 simulated CPU devices.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before
anything imports jax; pytest imports conftest.py first.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# The suite compiles hundreds of small programs and runs each only a few steps, so compiling dominates:
# LLVM's optimisation level 1 (XLA's default is 2) halves the compile time of, e.g., a sharded CLIP init
# (5.6 -> 2.7 s; its values bitwise the same) and cuts the tiny demo from 121 to 108 s.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network; make hub libraries fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One persistent XLA cache for the whole run, shared by the xdist workers and by the command-line runs
# the tests start in their own processes (all inherit the environment): the suite compiles the same
# small train steps, samplers and encoders for the same meshes in many tests, and only the first pays.
# The controller makes the directory before it starts the workers and removes it at exit; a cache set
# by the caller is used as it is. The key covers the program, devices, flags and jax version.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="clip-dalle-jax-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

pytest_plugins = ["tests.helpers.pipeline_cases"]  # the data-pipeline tests' shapes records and builder


@pytest.fixture(scope="session")
def n_devices():
    import jax

    n = len(jax.devices())
    assert n == 8, f"expected 8 simulated devices, found {n}: was jax imported before conftest.py?"
    return n
