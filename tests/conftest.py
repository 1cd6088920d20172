"""Test setup: every test sees 8 simulated CPU devices.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before
anything imports jax; pytest imports conftest.py first.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network; make hub libraries fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def n_devices():
    import jax

    n = len(jax.devices())
    assert n == 8, f"expected 8 simulated devices, found {n}: was jax imported before conftest.py?"
    return n
