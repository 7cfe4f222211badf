"""GLA kernels against the step-by-step recurrence (CPU, Pallas interpret mode)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels

gla_mod = importlib.import_module("pallas_kernels.gla")


def _inputs(seed, b, length, h, dk, dv, dtype, log_g_min=-5.0, log_g_max=0.0):
    kq, kk, kv, kg, ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(kq, (b, length, h, dk)).astype(dtype)
    k = jax.random.normal(kk, (b, length, h, dk)).astype(dtype)
    v = jax.random.normal(kv, (b, length, h, dv)).astype(dtype)
    log_g = jax.random.uniform(kg, (b, length, h, dk), minval=log_g_min,
                               maxval=log_g_max).astype(dtype)
    s0 = jax.random.normal(ks, (b, h, dk, dv), jnp.float32)
    return q, k, v, log_g, s0


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _loss(fn, seed):
    """A scalar that weighs every output and every final-state entry differently."""
    def loss(q, k, v, log_g, s0):
        o, st = fn(q, k, v, log_g, s0)
        w_o = jax.random.normal(jax.random.PRNGKey(seed), o.shape)
        w_s = jax.random.normal(jax.random.PRNGKey(seed + 1), st.shape)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(st * w_s), (o, st)
    return loss


def _check_against_recurrence(args, *, use_s0, backend, fwd_tol, grad_tol, dlog_g_tol=None,
                              blocks=None):
    q, k, v, log_g, s0 = args
    s0 = s0 if use_s0 else None
    up = lambda x: x.astype(jnp.float32)

    def kernel(q, k, v, log_g, s0):
        if blocks is not None:  # the GPU-style kernels with explicit tiling
            return gla_mod.gla_pallas(q, k, v, log_g, initial_state=s0, blocks=blocks,
                                      interpret=True)
        return pallas_kernels.gla(q, k, v, log_g, initial_state=s0, return_state=True,
                                  backend=backend)

    def recurrence(q, k, v, log_g, s0):
        return gla_mod.gla_recurrent_reference(up(q), up(k), up(v), up(log_g), initial_state=s0)

    # One pass each gives the outputs (as aux) and the gradients of a weighted sum of them.
    argnums = (0, 1, 2, 3, 4) if use_s0 else (0, 1, 2, 3)
    grad = lambda fn: jax.jit(jax.grad(_loss(fn, 7), argnums, has_aux=True))
    grads, (o, st) = grad(kernel)(q, k, v, log_g, s0)
    grads_ref, (o_ref, st_ref) = grad(recurrence)(q, k, v, log_g, s0)
    assert o.shape == o_ref.shape and o.dtype == v.dtype
    assert st.shape == st_ref.shape and st.dtype == jnp.float32
    assert _rel(o, o_ref) < fwd_tol
    assert _rel(st, st_ref) < fwd_tol
    for name, g, g_ref in zip(("dq", "dk", "dv", "dlog_g", "dinitial_state"), grads, grads_ref,
                              strict=False):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert g.shape == g_ref.shape, name
        tol = dlog_g_tol if name == "dlog_g" and dlog_g_tol else grad_tol
        assert _rel(g, g_ref) < tol, (name, _rel(g, g_ref))


def _mixed_gates(seed, b, length, dk):
    """Head 0 forgets almost nothing (log_g ~ -1e-3), head 1 decays by e^-4..e^-8 per step."""
    weak = jax.random.uniform(jax.random.PRNGKey(seed), (b, length, 1, dk), minval=-1e-3,
                              maxval=0.0)
    strong = jax.random.uniform(jax.random.PRNGKey(seed + 1), (b, length, 1, dk), minval=-8.0,
                                maxval=-4.0)
    return jnp.concatenate([weak, strong], axis=2)


@pytest.mark.parametrize("schedule", [
    "chunk_parallel", pytest.param("sequential", marks=pytest.mark.slow),
    pytest.param("hybrid", marks=pytest.mark.slow)])
def test_gla_matches_recurrence_f32_gates_from_nearly_one_to_strong_decay(schedule):
    # Ragged length (padded to the chunk), Dk != Dv, odd head dims (padded to powers of two),
    # and gates from ~1 to e^-8 per step: finite and exact to f32 rounding.
    q, k, v, _, s0 = _inputs(77, 1, 77, 2, 24, 8, jnp.float32)
    log_g = _mixed_gates(78, 1, 77, 24)
    _check_against_recurrence((q, k, v, log_g, s0), use_s0=True, backend="interpret",
                              fwd_tol=1e-5, grad_tol=1e-4,
                              blocks=gla_mod.GLABlocks(schedule=schedule, sub_chunk=16,
                                                       intra_block=16))


@pytest.mark.parametrize("schedule", [
    "chunk_parallel", pytest.param("sequential", marks=pytest.mark.slow)])
def test_gla_matches_recurrence_f32_state_split_into_blocks(schedule):
    # 2 blocks of Dv columns in the forward, 2 blocks of Dk rows in the dq pass, the dk/dv pass
    # split into a dv kernel over 2 column blocks and a dk kernel over 2 row blocks (Dk != Dv);
    # one state step per chunk of 64 rows (4 diagonal blocks of 16 and the scores between them);
    # the chunk-parallel states and dS passes over 2 x 4 tiles of [16, 16], loading each
    # chunk's tiles one iteration ahead.
    # log_g in [-1, 0]: the chunk-parallel state pass sums log gates over 64 rows at once and
    # its exp carries ~|b| * 6e-8 relative rounding (1e-5 at |b| ~ 300, log_g down to -5).
    args = _inputs(128, 1, 128, 2, 32, 64, jnp.float32, log_g_min=-1.0)
    blocks = gla_mod.GLABlocks(block_v=32, chunk_block_v=32, block_k=16, dkv_split=True,
                               block_k_dkv=16, block_v_dkv=32, schedule=schedule, sub_chunk=64,
                               states_block_k=16, states_block_v=16, states_prefetch=True)
    _check_against_recurrence(args, use_s0=False, backend="interpret", fwd_tol=1e-5,
                              grad_tol=1e-4, blocks=blocks)


@pytest.mark.parametrize("schedule, sub_chunk, intra_block, split, guard, fast_exp", [
    pytest.param("chunk_parallel", 64, 64, True, "cond", False, marks=pytest.mark.slow),
    ("chunk_parallel", 64, 64, True, "cond", True),          # the defaults' guard and exp
    ("chunk_parallel", 64, 64, True, "split", True),
    pytest.param("chunk_parallel", 64, 64, False, "split", False, marks=pytest.mark.slow),
    pytest.param("sequential", 64, 32, False, "cond", True, marks=pytest.mark.slow),
    pytest.param("hybrid", 32, 16, True, "cond", False, marks=pytest.mark.slow)])
def test_gla_matches_recurrence_f32_long_state_steps(schedule, sub_chunk, intra_block, split,
                                                     guard, fast_exp):
    # State steps of 32/64 rows made of diagonal blocks plus cross-block scores with decays split
    # at the earlier block's end. Gates: head 0 ~1 (blocks longer than 16 rows scored from
    # their middle row), head 1 e^-4..e^-8 per step (a step's total decay reaches e^-500: those
    # steps fall back to 16-row blocks): finite and exact to f32 rounding either way. guard
    # "split": the two cases run in two kernels writing the same outputs (the common forward,
    # dv and dk kernels contracting over 2 slices of Dk or Dv). fast_exp: every gate factor as
    # exp2(x * log2 e), the same function to f32 rounding, dlog_g's chunk-end term from the dS
    # pass (dstates_acc; ignored by the sliced dk kernel) and the default dv tile (all of Dv).
    q, k, v, _, s0 = _inputs(77, 1, 77, 2, 32, 32, jnp.float32)
    log_g = _mixed_gates(78, 1, 77, 32)
    blocks = gla_mod.GLABlocks(schedule=schedule, sub_chunk=sub_chunk, intra_block=intra_block,
                               dkv_split=split, block_k_dkv=16,
                               block_v_dkv=None if fast_exp else 16, guard=guard,
                               contract_slice=16 if guard == "split" else None,
                               fast_exp=fast_exp, dstates_acc=fast_exp)
    _check_against_recurrence((q, k, v, log_g, s0), use_s0=True, backend="interpret",
                              fwd_tol=1e-5, grad_tol=1e-4, blocks=blocks)


@pytest.mark.parametrize("fast", [False, True])
def test_gla_matches_recurrence_bf16(fast):
    # bf16 operands in the matmuls, f32 state: errors of a few 1e-3 relative. dlog_g is a
    # reverse cumsum of differences of such terms inside a chunk of 64: a few 1e-2. Run with
    # the chunk-parallel per-chunk states and dS stored in bf16 and 32-row state steps, one
    # diagonal block each (log_g in [-5, 0]: steps with total decay past e^-80 use 16-row blocks).
    # fast: exp2 gate factors, the in-chunk cumulative gates as triangular matmuls (bf16) and
    # dlog_g's chunk-end term from the dS pass.
    args = _inputs(3, 1, 93, 2, 16, 32, jnp.bfloat16)
    blocks = gla_mod.GLABlocks(schedule="chunk_parallel", sub_chunk=32, intra_block=32,
                               bf16_states=True, fast_exp=fast, cumsum_matmul=fast,
                               dstates_acc=fast)
    _check_against_recurrence(args, use_s0=True, backend="interpret", fwd_tol=1e-2,
                              grad_tol=1e-2, dlog_g_tol=6e-2, blocks=blocks)


def test_gla_tpu_kernel_matches_recurrence():
    # The Mosaic TPU kernels in TPU interpret mode: ragged length over two chunks, Dk != Dv.
    args = _inputs(17, 1, 100, 1, 32, 16, jnp.float32)
    _check_against_recurrence(args, use_s0=True, backend="tpu_interpret", fwd_tol=1e-5,
                              grad_tol=1e-4)


@pytest.mark.slow
def test_gla_tpu_kernel_matches_recurrence_bf16():
    args = _inputs(19, 2, 93, 2, 32, 64, jnp.bfloat16)
    _check_against_recurrence(args, use_s0=True, backend="tpu_interpret", fwd_tol=1e-2,
                              grad_tol=1e-2, dlog_g_tol=6e-2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
def test_gla_matches_recurrence_long(dtype, tol):
    args = _inputs(21, 2, 700, 2, 64, 128, dtype)
    _check_against_recurrence(args, use_s0=True, backend="interpret", fwd_tol=tol,
                              grad_tol=tol, dlog_g_tol=6e-2)


def test_gla_step_continues_the_kernel_state():
    q, k, v, log_g, s0 = _inputs(9, 2, 40, 2, 16, 16, jnp.float32)
    o_full, st_full = gla_mod.gla_recurrent_reference(q, k, v, log_g, initial_state=s0)
    # Prefill 32 tokens with the kernel, then decode the rest one step at a time.
    o_pre, state = pallas_kernels.gla(q[:, :32], k[:, :32], v[:, :32], log_g[:, :32],
                                      initial_state=s0, return_state=True, backend="interpret")
    outs = [o_pre]
    for t in range(32, 40):
        o_t, state = pallas_kernels.gla_step(q[:, t], k[:, t], v[:, t], log_g[:, t], state)
        outs.append(o_t[:, None])
    assert _rel(jnp.concatenate(outs, axis=1), o_full) < 1e-5
    assert _rel(state, st_full) < 1e-5


def test_gla_is_causal():
    q, k, v, log_g, _ = _inputs(4, 2, 32, 2, 16, 16, jnp.float32)
    o = pallas_kernels.gla(q, k, v, log_g, backend="interpret")
    o2 = pallas_kernels.gla(q, k.at[:, 20].add(1.0), v.at[:, 20].add(1.0), log_g,
                            backend="interpret")
    np.testing.assert_array_equal(np.asarray(o[:, :20]), np.asarray(o2[:, :20]))
    assert not np.allclose(np.asarray(o[:, 20:]), np.asarray(o2[:, 20:]))


def test_gla_rejects_bad_shapes():
    q, k, v, log_g, s0 = _inputs(1, 1, 8, 1, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match="log_g"):
        pallas_kernels.gla(q, k, v, log_g[..., :8], backend="interpret")
    with pytest.raises(ValueError, match="initial_state"):
        pallas_kernels.gla(q, k, v, log_g, initial_state=s0[..., :8], backend="interpret")
