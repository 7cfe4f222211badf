"""Shared test helpers: deterministic random inputs (never zeros), one JAX compilation cache for
the whole test session, and results computed once per session for every pytest-xdist worker.

Most of the suite's time is XLA compiling small programs, and many tests compile the same ones
again (a training run resumed from its checkpoint, the tiny configs shared by the training
tests, the subprocesses of the CLI and multi-device tests). A persistent compilation cache in a
fresh temporary directory, set before jax starts and inherited by subprocesses through the
environment, turns those repeats into cache reads. It starts empty every session (nothing is
reused from an earlier run) and is removed at the end; `MIXER_ZOO_TEST_CACHE=0` turns it off.

`pytest -n auto` (pytest-xdist) spreads the tests over worker processes, so a module-scoped
fixture would run once per worker that gets one of its tests. The expensive ones (the
eight-device subprocess of tests/training/test_sharding.py, the TPU compiles of
tests/kernels/test_tpu_lowering.py) go through the `session_shared` fixture instead: the first
worker computes the (JSON) result under a file lock in a directory of the session, the others
read it. The directory is made by the process that starts first (the xdist controller, whose
environment the workers inherit) and removed by it at the end.
"""

import hashlib
import json
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

# XLA:CPU at backend optimisation level 0: the suite's programs are small and compiled once or
# twice, so LLVM's optimisations cost more than they save (tests/kernels/test_gla.py 97 -> 57 s
# on a 2-core machine, 2026-11-29). Numerics stay within the tests' tolerances; subprocesses
# inherit it; `MIXER_ZOO_TEST_XLA_O0=0` (or an XLA_FLAGS that sets the level) keeps XLA's own.
if (os.environ.get("MIXER_ZOO_TEST_XLA_O0", "1") != "0"
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

if "MIXER_ZOO_TEST_SHARED" not in os.environ:
    _SHARED_DIR = tempfile.mkdtemp(prefix="mixer-zoo-shared-")
    os.environ["MIXER_ZOO_TEST_SHARED"] = _SHARED_DIR
else:
    _SHARED_DIR = None          # made by the controller of this session (or set by the caller)

import jax  # noqa: E402  (after the cache environment: jax reads it at import)
import pytest  # noqa: E402

if _CACHE_DIR is not None:     # in case a plugin imported jax before this file
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
    for folder in (_CACHE_DIR, _SHARED_DIR):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _shared_once(key: str, compute):
    """compute() once per test session, whichever process asks first; its JSON result is read
    back by every later caller (other pytest-xdist workers wait on the lock meanwhile). A
    compute that raises leaves nothing behind, so the next caller tries again."""
    try:
        import fcntl
    except ImportError:             # no POSIX file locks: every process computes its own
        return compute()
    path = os.path.join(os.environ["MIXER_ZOO_TEST_SHARED"],
                        hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(path):
                with open(path) as f:
                    return json.load(f)
            result = compute()
            with open(path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)
            return json.loads(json.dumps(result))   # the same (JSON) form as the readers get
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def session_shared():
    """session_shared(key, compute): compute() once per test session across pytest-xdist
    workers (JSON-serialisable results; see the module docstring)."""
    return _shared_once


@pytest.fixture
def keys():
    """A function giving n independent PRNG keys."""
    return lambda n, seed=0: list(jax.random.split(jax.random.PRNGKey(seed), n))
