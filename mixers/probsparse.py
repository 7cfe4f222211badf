"""ProbSparse self-attention (Zhou et al. 2021, "Informer: Beyond Efficient Transformer for Long
Sequence Time-Series Forecasting", AAAI), as a mixer x [B, L, d_model] -> [B, L, d_model].

    q, k, v = x W_q, x W_k, x W_v                         [B, L, H, Dh]
    n_sample = min(factor * ceil(ln L_K), L_K)            keys sampled per query
    M(q_i) = max_s q_i k_s^T - sum_s q_i k_s^T / L_K      sparsity measure on the sampled keys s
    u = min(factor * ceil(ln L_Q), L_Q)                   "active" queries: the top-u by M
    out_i = softmax(q_i K^T / sqrt(Dh)) V                 for active queries (masked when causal)
    out_i = mean(V)  (bidirectional)  or  cumsum(V)_i  (causal)    for the other, "lazy" queries

Cost O(L ln L) per head instead of O(L^2). With u >= L every query is active and the layer is
exactly full softmax attention (tested).

Two implementations of the same layer (same sampled keys, same active queries; tested equal):
- `impl: reference` (the default off GPU): plain jnp in [B, H, L, D]; `per_query` gathers the
  [B, H, L, S, D] sampled keys as a dot operand, which is why the public code is slow.
- `impl: pallas` (the default on GPU; `interpret` runs it on CPU): in the [B, L, H, D] layout
  without transposes, three Pallas kernels (pallas_kernels/probsparse.py): M (a dot against the
  shared sample, or row gathers from K per query, never writing the gathered keys), top-u
  without a sort, and the output of each (batch, head) in one kernel (the u rows gathered and
  attended over all keys, mean(V) summed on the way into the lazy rows), with a backward kernel
  of the same shape (dk, dv of a head in one program: no atomics). Causal variants keep the u
  rows as a dense masked [u, L] block in XLA. `TUNING` (V1: flash on the gathered rows). Speed:
  docs/informer.md.

Paper vs the authors' public code (zhouhaoyi/Informer2020, `models/attn.py`), and what we follow:
- Sampling: the paper samples U = L_K ln L_Q dot-product pairs in total; the code samples
  `factor * ceil(ln L_K)` keys for each query (one draw per call, shared by batch and heads).
  We follow the code (`sampling: per_query`). `sampling: shared` scores every query against one
  shared set of sampled keys: a dense [L, n_sample] matmul instead of a gather (faster on GPUs,
  not in either source).
- The measure: the paper's M subtracts the mean over all L_K keys of the scaled scores; the code
  divides the sum over the *sampled* keys by L_K and leaves the scores unscaled (the ranking is
  unchanged by the positive scale, not by the divisor). We follow the code.
- Lazy queries: the paper gives them mean(V); the code uses mean(V) in the encoder and the
  cumulative *sum* of V (not the mean) in masked self-attention. We follow the code;
  `lazy_causal: cummean` gives the running mean instead.
- Causality. The code's masked variant picks the top-u queries over the whole sequence and
  samples keys from the whole sequence, so which queries are active depends on future inputs
  (values are still masked). That is `query_selection: global` (the default when bidirectional,
  and what configs/informer*.yaml use in the decoder, whose inputs are all known in advance).
  `query_selection: prefix` (the default with causal: true) is strictly causal: query i samples
  keys j <= i only, and is active when its M is in the top u / L fraction of M over queries
  0..i (at least the top one), capped at min(2u, L) active queries in order of position. It is
  our variant, not in the paper; the perturbation test checks it.
- The code's decoder self-attention uses `mix=True`, which reinterprets the [B, H, L, D] output
  as [B, L, H * D] before the output projection: output row l takes H consecutive positions of
  one head (positions (l*H) mod L .. +H-1 of head l*H // L when H divides L). Not in the paper,
  and not causal (a row can read later positions), but it is the code the paper's numbers came
  from. `mix_heads: true` reproduces it (bench/informer.py's `probsparse_mix` rows); the default
  is the plain [B, L, H * D] layout.

Randomness: the sampled key indices come from an nnx.Rngs stream ("sample", falling back to
"default") forked at construction. Each call draws a fresh key, like the code's torch.randint;
under jit the draw advances the stream's counter in the module state, so training steps resample
while evaluation (whose state is not written back) reuses one sample. Deterministic given the
seed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from mixers.base import ConfigError, Mixer, MixerConfig, check_heads, dense
from pallas_kernels import _common
from pallas_kernels.attention import flash_attention_kernel
from pallas_kernels.probsparse import (
    active_rows_attention,
    rows_padding,
    sparsity_measure,
    sparsity_reference,
    top_u,
)


def probsparse_sizes(l_q: int, l_k: int, factor: int) -> tuple[int, int]:
    """(n_sample, u): sampled keys per query and active queries, as the authors' code."""
    n_sample = min(factor * math.ceil(math.log(l_k)), l_k) if l_k > 1 else 1
    u = min(factor * math.ceil(math.log(l_q)), l_q) if l_q > 1 else 1
    return n_sample, u


def draw_samples(key, l_q: int, l_k: int, n_sample: int, *, sampling: str,
                 causal_samples: bool):
    """Sampled key indices: [S] (`shared`) or [Lq, S] (`per_query`; uniform over keys 0..i for
    query i with `causal_samples`). One draw per call, shared by batch and heads (the code's)."""
    if sampling == "shared":
        return jax.random.randint(key, (n_sample,), 0, l_k)
    if causal_samples:
        r = jax.random.uniform(key, (l_q, n_sample))
        idx_LS = jnp.floor(r * (jnp.arange(l_q)[:, None] + 1)).astype(jnp.int32)
        return jnp.minimum(idx_LS, l_k - 1)
    return jax.random.randint(key, (l_q, n_sample), 0, l_k)


def _prefix_selection(m_BHL, u):
    """Strictly causal choice of active queries: indices [B, H, cap] (L = padding)."""
    length = m_BHL.shape[-1]
    pos = jnp.arange(length)
    # rank of M_i among M_0..M_i (0 = largest); reduce over j fuses, no [L, L] buffer on GPU.
    earlier_larger = (m_BHL[..., None, :] > m_BHL[..., :, None]) & (pos[None, :] < pos[:, None])
    rank = earlier_larger.sum(-1)
    quota = jnp.maximum(1, (u * (pos + 1)) // length)
    active = rank < quota
    cap = min(2 * u, length)
    slot = jnp.cumsum(active, axis=-1) - 1
    slot = jnp.where(active & (slot < cap), slot, cap)                 # cap = dropped
    idx = jnp.full(m_BHL.shape[:-1] + (cap,), length, jnp.int32)
    b, h = jnp.indices(m_BHL.shape[:-1])
    return idx.at[b[..., None], h[..., None], slot].set(
        jnp.broadcast_to(pos, m_BHL.shape).astype(jnp.int32), mode="drop")


def _select(m_BHL, u, prefix: bool):
    """Active query indices [B, H, U]: top-u by M (global) or the strictly causal choice."""
    if prefix:
        return _prefix_selection(m_BHL, u)
    return jax.lax.top_k(m_BHL, u)[1].astype(jnp.int32)


def _reference(q, k, v, idx, *, u, causal, prefix, lazy_causal, sm_scale):
    """The plain jnp form in [B, H, L, D] (dense [u, Lk] rows, scatter into the lazy fill)."""
    q_BHLD, k_BHLD, v_BHLD = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    b, h, l_q, _ = q_BHLD.shape
    l_k = k_BHLD.shape[2]
    # The sampled scores only choose which queries are active (an integer choice): no gradient.
    m_BHL = sparsity_reference(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), idx,
                               causal_samples=prefix and idx.ndim == 1)
    top_BHU = _select(m_BHL, u, prefix)
    bi, hi = jnp.indices((b, h))
    bi, hi = bi[..., None], hi[..., None]
    q_top = q_BHLD[bi, hi, jnp.minimum(top_BHU, l_q - 1)]                # [B, H, U, D]
    s = jnp.einsum("bhud,bhkd->bhuk", q_top, k_BHLD).astype(jnp.float32) * sm_scale
    if causal:
        s = jnp.where(jnp.arange(l_k)[None, None, None, :] <= top_BHU[..., None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out_top = jnp.einsum("bhuk,bhkd->bhud", p, v_BHLD.astype(jnp.float32))
    context = _lazy_fill(v_BHLD, 2, l_q, causal, lazy_causal)
    context = context.at[bi, hi, top_BHU].set(out_top, mode="drop")
    return jnp.swapaxes(context, 1, 2).astype(q.dtype)


def _lazy_fill(v, axis: int, l_q: int, causal: bool, lazy_causal: str):
    """The lazy queries' output (f32, length l_q along `axis`): mean(V) broadcast, cumsum(V) or
    the running mean (causal: l_q == Lk)."""
    v32 = v.astype(jnp.float32)
    if not causal:
        shape = list(v.shape)
        shape[axis] = l_q
        return jnp.broadcast_to(v32.mean(axis, keepdims=True), shape)
    context = jnp.cumsum(v32, axis=axis)
    if lazy_causal == "cummean":
        shape = [1] * v.ndim
        shape[axis] = v.shape[axis]
        context = context / jnp.arange(1, v.shape[axis] + 1).reshape(shape)
    return context


def _fused(q, k, v, idx, *, u, causal, prefix, lazy_causal, sm_scale, backend, tuning):
    """The kernel path, in the [B, L, H, D] layout (no transposes): M by the Pallas kernel (no
    [B, H, L, S, D] gather), top-u (kernel or lax.top_k), then (bidirectional) the active-rows
    kernels or flash on the gathered rows plus a scatter into the fill; causal: dense rows."""
    b, l_q, h, _ = q.shape
    m_BHL = sparsity_measure(q, k, idx, causal_samples=prefix and idx.ndim == 1,
                             backend=backend, **tuning.get("measure", {}))
    d = q.shape[3]
    kernel_top = not prefix and tuning.get("top_u") == "kernel"
    if (not causal and tuning.get("rows") == "kernel" and d >= 16 and not d & (d - 1)
            and rows_padding(l_q, u)):
        # One Pallas kernel each way writes the whole output: the u rows (gathered, attended)
        # and the mean(V) fill. It takes u_pad distinct rows, the u active ones first.
        top_ext = (top_u(m_BHL, u, backend=backend, permutation=True) if kernel_top
                   else jax.lax.top_k(m_BHL, rows_padding(l_q, u))[1])
        return active_rows_attention(q, k, v, top_ext, sm_scale=sm_scale, backend=backend,
                                     top_is_extended=True, u=u)
    if kernel_top:
        top_BHU = top_u(m_BHL, u, backend=backend)      # the same set, in position order
    else:
        top_BHU = _select(m_BHL, u, prefix)
    top_BUH = jnp.swapaxes(top_BHU, 1, 2)                                # [B, U, H]
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, None, :]
    q_top = q[bi, jnp.minimum(top_BUH, l_q - 1), hi]                   # [B, U, H, D]
    if causal:
        # Query i sees keys j <= i at its own position: not flash's causal mask (which places the
        # U gathered queries at the last U positions), so the [U, Lk] rows stay dense here.
        s = jnp.einsum("buhd,bkhd->bhuk", q_top, k,
                       preferred_element_type=jnp.float32) * sm_scale
        visible = jnp.arange(k.shape[1]) <= jnp.swapaxes(top_BUH, 1, 2)[..., None]
        p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
        o_top = jnp.einsum("bhuk,bkhd->buhd", p, v.astype(jnp.float32))
        out = _lazy_fill(v, 1, l_q, causal, lazy_causal)
    else:
        if backend == "interpret":
            o_top = pk.flash_attention(q_top, k, v, sm_scale=sm_scale, backend="interpret")
        else:
            o_top = flash_attention_kernel(q_top, k, v, sm_scale=sm_scale,
                                           **tuning.get("flash", {}))
        fill = v.astype(jnp.float32).mean(1, keepdims=True).astype(q.dtype)   # [B, 1, H, D]
        out = jnp.broadcast_to(fill, q.shape)
    out = out.at[bi, top_BUH, hi].set(o_top.astype(out.dtype), mode="drop",
                                      unique_indices=not prefix)
    return out.astype(q.dtype)


# Tuning of the kernel path. "measure": block sizes of sparsity_measure. "top_u": "kernel"
# (pallas_kernels.probsparse.top_u: no sort) or "xla" (lax.top_k). "rows" (bidirectional):
# "kernel" (pallas_kernels.probsparse.active_rows_attention: one kernel each way writes the
# whole output, the u attention rows and the mean(V) fill) or "flash" (gather the u query
# rows, flash_attention_kernel with the options "flash" (GPU only; the Triton forward: the
# Mosaic forward's 2 x 128-row tiles would pad u ~ 35 to 256), scatter into the fill).
# V1 is the session-4 call-2 path; docs/informer.md has the measurements of both.
V1 = {"flash": {"fwd_impl": "triton"}, "top_u": "xla", "measure": {}, "rows": "flash"}
TUNING = {**V1, "top_u": "kernel", "rows": "kernel"}


def probsparse_attention(q, k, v, key, *, factor: int = 5, causal: bool = False,
                         query_selection: str = "global", sampling: str = "per_query",
                         lazy_causal: str = "cumsum", sm_scale: float | None = None,
                         backend: str | None = None, tuning: dict | None = None):
    """ProbSparse attention on q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `key` draws the sampled keys. See the module docstring for the options. `backend`: None
    (the kernel path on GPU, the jnp form elsewhere), "pallas", "interpret" (the kernel path
    with Pallas in interpret mode) or "reference" (the plain jnp form). `tuning`: replaces
    TUNING (the kernel path's options; "flash" applies on GPU only).
    """
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal ProbSparse attention needs Lq == Lk, got q {q.shape}, "
                         f"k {k.shape}")
    l_q, l_k, d = q.shape[1], k.shape[1], q.shape[3]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    n_sample, u = probsparse_sizes(l_q, l_k, factor)
    prefix = causal and query_selection == "prefix"
    idx = draw_samples(key, l_q, l_k, n_sample, sampling=sampling, causal_samples=prefix)
    kw = dict(u=u, causal=causal, prefix=prefix, lazy_causal=lazy_causal, sm_scale=sm_scale)
    backend = _common.resolve_backend(backend)
    if backend == "reference" or _common.platform() == "tpu" or backend == "tpu_interpret":
        return _reference(q, k, v, idx, **kw)
    return _fused(q, k, v, idx, backend=backend, tuning=TUNING if tuning is None else tuning,
                  **kw)


@dataclasses.dataclass(frozen=True)
class ProbSparseConfig(MixerConfig):
    n_heads: int = 8
    head_dim: int | None = None
    factor: int = 5
    query_selection: str | None = None     # None: "prefix" when causal, else "global"
    sampling: str = "per_query"
    lazy_causal: str = "cumsum"
    use_bias: bool = True                  # the authors' nn.Linear projections have biases
    mix_heads: bool = False                # the authors' decoder `mix=True` reshape

    @classmethod
    def valid_impls(cls):
        return ("pallas", "interpret", "reference")

    def validate(self, d_model: int) -> None:
        super().validate(d_model)
        check_heads(self.n_heads, self.head_dim, d_model)
        if self.factor < 1:
            raise ConfigError("factor", f"must be >= 1, got {self.factor}")
        choices = {"query_selection": (None, "global", "prefix"),
                   "sampling": ("per_query", "shared"), "lazy_causal": ("cumsum", "cummean")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(key, f"must be one of {valid}, got {getattr(self, key)!r}")

    @property
    def selection(self) -> str:
        return self.query_selection or ("prefix" if self.causal else "global")


class ProbSparseAttention(Mixer):
    """Informer's ProbSparse self-attention. Args (ProbSparseConfig): n_heads, head_dim,
    factor (c in u = c ln L), causal, query_selection (global | prefix), sampling
    (per_query | shared), lazy_causal (cumsum | cummean), use_bias, mix_heads (the authors'
    `mix=True` reshape of [B, H, L, D] as [B, L, H*D]), impl (pallas | interpret | reference;
    unset: the kernel path on GPU, the jnp form on CPU)."""

    def __init__(self, cfg: ProbSparseConfig, *, d_model: int, rngs: nnx.Rngs, dtype=None):
        self.cfg, self.causal = cfg, cfg.causal
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or d_model // cfg.n_heads
        inner = self.n_heads * self.head_dim
        kw = dict(rngs=rngs, dtype=dtype, use_bias=cfg.use_bias)
        self.q_proj = dense(d_model, inner, ("embed", "heads"), **kw)
        self.k_proj = dense(d_model, inner, ("embed", "heads"), **kw)
        self.v_proj = dense(d_model, inner, ("embed", "heads"), **kw)
        self.o_proj = dense(inner, d_model, ("heads", "embed"), **kw)
        self.rngs = rngs["sample"].fork()

    def __call__(self, x, *, segment_ids=None, positions=None):
        if segment_ids is not None:
            raise ValueError("ProbSparseAttention does not support segment_ids (packed "
                             "sequences)")
        b, l, _ = x.shape
        q, k, v = (p(x).reshape(b, l, self.n_heads, self.head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        cfg = self.cfg
        o = probsparse_attention(q, k, v, self.rngs(), factor=cfg.factor, causal=self.causal,
                                 query_selection=cfg.selection, sampling=cfg.sampling,
                                 lazy_causal=cfg.lazy_causal, backend=cfg.impl)
        if cfg.mix_heads:                  # [B, L, H, D] -> [B, H, L, D], read as [B, L, H*D]
            o = jnp.swapaxes(o, 1, 2)
        return self.o_proj(o.reshape(b, l, -1))
