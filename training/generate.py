"""Autoregressive sampling with per-mixer caches (KV cache for attention, recurrent state for
GLA and Mamba, running pools for causal pooling).

    tokens = generate(model, prompt_BP, max_new_tokens=100, temperature=0.8, seed=0)

prompt [B, P] int -> [B, P + max_new_tokens]. The prompt is fed one token at a time through the
same cached step the sampling uses, so no separate prefill path can disagree with decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _sample(logits_BV, key, temperature: float, top_k: int | None):
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


def generate(model, prompt, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """Sample continuations of `prompt` [B, P] (P >= 1). temperature 0 = greedy."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape [batch, length >= 1], got {prompt.shape}")
    bsz, plen = prompt.shape
    total = plen + max_new_tokens
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token_B, caches, key, forced_B, use_forced):
        logits, caches = nnx.merge(graphdef, state).decode(token_B[:, None], caches)
        sampled = _sample(logits[:, 0], key, temperature, top_k).astype(jnp.int32)
        return jnp.where(use_forced, forced_B, sampled), caches

    caches = model.init_cache(bsz, total)
    key = jax.random.PRNGKey(seed)
    out = [prompt[:, 0]]
    token = prompt[:, 0]
    for t in range(total - 1):
        key, sub = jax.random.split(key)
        forced = prompt[:, t + 1] if t + 1 < plen else token
        token, caches = step(state, token, caches, sub, forced, t + 1 < plen)
        out.append(token)
    return np.asarray(jnp.stack(out, axis=1))
