"""Shared test helpers: deterministic random inputs (never zeros), and one JAX compilation
cache for the whole test session.

Most of the suite's time is XLA compiling small programs, and many tests compile the same ones
again (a training run resumed from its checkpoint, the tiny configs shared by the training
tests, the subprocesses of the CLI and multi-device tests). A persistent compilation cache in a
fresh temporary directory, set before jax starts and inherited by subprocesses through the
environment, turns those repeats into cache reads. It starts empty every session (nothing is
reused from an earlier run) and is removed at the end; `MIXER_ZOO_TEST_CACHE=0` turns it off.
"""

import os
import shutil
import tempfile

if (os.environ.get("MIXER_ZOO_TEST_CACHE", "1") != "0"
        and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
    _CACHE_DIR = tempfile.mkdtemp(prefix="mixer-zoo-jax-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
else:
    _CACHE_DIR = None

import jax  # noqa: E402  (after the cache environment: jax reads it at import)
import pytest  # noqa: E402

if _CACHE_DIR is not None:     # in case a plugin imported jax before this file
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture
def keys():
    """A function giving n independent PRNG keys."""
    return lambda n, seed=0: list(jax.random.split(jax.random.PRNGKey(seed), n))
