"""Shared test helpers: deterministic random inputs (never zeros)."""

import jax
import pytest


@pytest.fixture
def keys():
    """A function giving n independent PRNG keys."""
    return lambda n, seed=0: list(jax.random.split(jax.random.PRNGKey(seed), n))
