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

pytest_plugins = ["tests.helpers.pipeline_cases"]  # the data-pipeline tests' shapes records and builder


@pytest.fixture(scope="session")
def n_devices():
    import jax

    n = len(jax.devices())
    assert n == 8, f"expected 8 simulated devices, found {n}: was jax imported before conftest.py?"
    return n


_CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for one test module's runs: its smoke runs (and command-line ones, in
    their own processes) compile the same steps, so only the first pays for compiling them."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path_factory.mktemp("xla_cache"))
    saved = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir", *_CACHE_OPTIONS)}
    for name, value in {"jax_compilation_cache_dir": path, **_CACHE_OPTIONS}.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # the cache is set up once per process: make it see the new dir
    yield path
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
