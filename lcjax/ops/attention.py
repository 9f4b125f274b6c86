"""Scaled dot-product attention: a dense reference, fast variants behind ``impl=``, and KV-cache decoding.

"Attention Is All You Need", Vaswani et al. 2017, https://arxiv.org/abs/1706.03762; GQA: Ainslie et al. 2023,
https://arxiv.org/abs/2305.13245; MQA: Shazeer 2019, https://arxiv.org/abs/1911.02150. Fast paths:
``lcjax.ops.attention_blockwise`` (pure-JAX flash attention), ``jax.nn.dot_product_attention`` (XLA / cuDNN) and
the Pallas splash kernel (``jax/experimental/pallas/ops/tpu/splash_attention``). Parity is tested against
``torch.nn.functional.scaled_dot_product_attention`` and a float64 numpy computation.

Layout: q ``[B, L, H, P]``, k and v ``[B, S, K, P]`` with ``H % K == 0``; query head ``h`` uses kv head
``h // (H // K)``, computed by viewing q as ``[B, L, K, R, P]`` (k/v are never repeated). Masking (positions,
segment ids, causal, sliding window) is defined once in ``lcjax.ops.masks``; segment ids mean what
``lcjax.ops.segments`` says (equal ids attend; empty KV-cache slots carry an id no query has). Logits and
softmax run in float32, the output has ``q.dtype``, the default scale is ``1/sqrt(P)``; a query with no visible
key gets output 0 and lse ``-inf`` (never NaN).

Dimension key (lcjax/typing.py): B batch, L query length, S key length, H query heads, K kv heads,
R query heads per kv head, P head dim.
"""

import enum

import jax
import jax.numpy as jnp

from lcjax import checks
from lcjax.ops import masks
from lcjax.ops.attention_blockwise import DEFAULT_BLOCK, blockwise_attention, blockwise_checked, merge_attention
from lcjax.typing import Array, Float, Int

__all__ = [
    "Impl",
    "attention_reference",
    "available_impls",
    "blockwise_attention",
    "decode_attention",
    "dot_product_attention",
    "merge_attention",
    "resolve_impl",
]

DENSE_MAX_QUERY_LEN = 16
"""``impl="auto"`` uses the dense path for L <= this (decoding, speculative steps): no tiles, no padding."""

_F32 = jnp.float32
_GPU_BACKENDS = ("gpu", "cuda", "rocm")


class Impl(enum.StrEnum):
    """Attention implementations. ``AUTO`` picks per backend and arguments (see ``resolve_impl``)."""

    AUTO = "auto"
    REFERENCE = "reference"  # dense [L, S] logits in float32, autodiff; the oracle
    BLOCKWISE = "blockwise"  # pure-JAX flash attention with custom VJP; any mask, any backend
    XLA = "xla"  # jax.nn.dot_product_attention(implementation="xla") with our boolean mask
    CUDNN = "cudnn"  # jax.nn.dot_product_attention(implementation="cudnn"); GPU, default positions/segments only
    SPLASH = "splash"  # Pallas TPU splash kernel; default positions, L and S multiples of 128
    SPLASH_INTERPRET = "splash_interpret"  # the same kernel in Pallas interpret mode (runs on CPU, for tests)


def _dense_attention(q, k, v, mask_BLS, scale):
    """Dense masked softmax attention in float32: ``(out [B, L, H, P] in q.dtype, lse [B, L, H] f32)``."""
    B, L, H, P = q.shape
    K = k.shape[2]
    q_BLKRP = q.reshape(B, L, K, H // K, P).astype(_F32)
    s_BKRLS = jnp.einsum("BLKRP,BSKP->BKRLS", q_BLKRP, k.astype(_F32)) * scale
    s_BKRLS = jnp.where(mask_BLS[:, None, None], s_BKRLS, -jnp.inf)
    m_BKRL1 = jax.lax.stop_gradient(jnp.max(s_BKRLS, axis=-1, keepdims=True))
    m_BKRL1 = jnp.where(m_BKRL1 == -jnp.inf, 0.0, m_BKRL1)
    p_BKRLS = jnp.exp(s_BKRLS - m_BKRL1)
    l_BKRL1 = jnp.sum(p_BKRLS, axis=-1, keepdims=True)
    seen_BKRL1 = l_BKRL1 > 0
    l_safe_BKRL1 = jnp.where(seen_BKRL1, l_BKRL1, 1.0)
    probs_BKRLS = p_BKRLS / l_safe_BKRL1  # rows with no visible key are all zeros
    out_BLKRP = jnp.einsum("BKRLS,BSKP->BLKRP", probs_BKRLS, v.astype(_F32))
    lse_BKRL = jnp.where(seen_BKRL1, m_BKRL1 + jnp.log(l_safe_BKRL1), -jnp.inf)[..., 0]
    return out_BLKRP.reshape(B, L, H, P).astype(q.dtype), jnp.moveaxis(lse_BKRL, 3, 1).reshape(B, L, H)


def attention_reference(
    q: Float[Array, "B L H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    *,
    causal: bool = True,
    q_segment_ids: Int[Array, "B L"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    q_positions: Int[Array, "B L"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    window: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Float[Array, "B L H P"] | tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """Dense softmax attention, obviously correct: builds the full ``[B, H, L, S]`` float32 logits.

    Mask rule in ``lcjax.ops.masks``. Returns out (``q.dtype``), or ``(out, lse)`` with float32 lse ``[B, L, H]``
    when ``return_lse``. Differentiable by plain autodiff (memory O(L·S)); use it as the oracle and for short L.
    """
    inputs = masks.check_attention_inputs(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, window=window, scale=scale)  # fmt: skip
    out, lse = _dense_attention(q, k, v, inputs.mask(causal=causal, window=window), inputs.scale)
    return (out, lse) if return_lse else out


def decode_attention(
    q: Float[Array, "B L H P"],
    k_cache: Float[Array, "B S K P"],
    v_cache: Float[Array, "B S K P"],
    *,
    q_positions: Int[Array, "B L"],
    kv_positions: Int[Array, "B S"],
    **kwargs,
) -> Float[Array, "B L H P"] | tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """Attention of a few new queries (``L = 1`` per decode step, or a short chunk) against a KV cache.

    The cache holds ``S`` slots with their absolute ``kv_positions``; the new tokens' ``q_positions`` are
    required. Mark empty (not yet written) slots with a segment id no query has (``lcjax.layers.attention`` uses
    ``EMPTY_SEGMENT = -1``), or give them positions greater than every query position, for causal attention. A
    dense masked path: for small L the ``[L, S]`` logits are tiny, and there is no tiling or padding overhead. Same
    result as ``attention_reference`` with the same arguments (``kwargs``: its other keywords: segment ids,
    ``causal``, ``window``, ``scale``, ``return_lse``), which ``dot_product_attention(impl="auto")`` runs for
    ``L <= DENSE_MAX_QUERY_LEN``.
    """
    return attention_reference(q, k_cache, v_cache, q_positions=q_positions, kv_positions=kv_positions, **kwargs)


def _row_has_key(mask_BLS):
    return jnp.any(mask_BLS, axis=-1)


def _jax_nn_attention(q, k, v, *, implementation, mask_BLS, causal, window, scale, return_lse):
    """``jax.nn.dot_product_attention``; its lse is stop-gradient and in the input dtype (cast to f32 here)."""
    kwargs = dict(scale=scale, implementation=implementation, return_residual=return_lse)
    if mask_BLS is not None:
        kwargs["mask"] = mask_BLS[:, None]
    else:  # cuDNN: default positions, so the mask is the index-based causal / window mask of jax.nn
        kwargs["is_causal"] = causal
        if window is not None:
            kwargs["local_window_size"] = (window - 1, 0 if causal else window - 1)
    res = jax.nn.dot_product_attention(q, k, v, **kwargs)
    out, lse = res if return_lse else (res, None)
    if mask_BLS is not None:  # jax.nn gives rows with no visible key the mean of v; ours give 0 and lse -inf
        has_BL = _row_has_key(mask_BLS)
        out = jnp.where(has_BL[:, :, None, None], out, jnp.zeros((), out.dtype))
        if lse is not None:
            lse = jnp.where(has_BL[:, :, None], lse.astype(_F32), -jnp.inf)
    return (out, None if lse is None else lse.astype(_F32)) if return_lse else out


def _splash_block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def _splash_attention(q, k, v, q_seg, kv_seg, *, causal, window, scale, return_lse, interpret):
    """Pallas splash attention (TPU; ``interpret=True`` runs it on CPU). Default positions only."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, L, H, P = q.shape
    S = k.shape[1]
    if window is not None:  # kv in [q - (window - 1), q + right]: the masks.make_mask window on arange positions
        base = sa.LocalMask((L, S), window_size=(window - 1, 0 if causal else window - 1), offset=0)
    elif causal:
        base = sa.CausalMask((L, S))
    else:
        base = sa.FullMask((L, S))
    bq, bk = _splash_block(L), _splash_block(S)
    block_sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                                block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([base] * H), block_sizes=block_sizes, head_shards=1,
                                q_seq_shards=1, save_residuals=return_lse, interpret=interpret)
    q_BHLP = jnp.swapaxes((q.astype(_F32) * scale).astype(q.dtype), 1, 2)  # splash does not scale q itself
    k_BKSP, v_BKSP = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if q_seg is None:
        res = jax.vmap(kernel)(q_BHLP, k_BKSP, v_BKSP)
    else:
        res = jax.vmap(lambda q_, k_, v_, qs, ks: kernel(q_, k_, v_, segment_ids=sa.SegmentIds(q=qs, kv=ks)))(
            q_BHLP, k_BKSP, v_BKSP, q_seg, kv_seg)
    if return_lse:
        out_BHLP, (lse_BHL,) = res
        return jnp.swapaxes(out_BHLP, 1, 2), jnp.swapaxes(lse_BHL, 1, 2).astype(_F32)
    return jnp.swapaxes(res, 1, 2)


def available_impls(backend: str | None = None) -> tuple[Impl, ...]:
    """The implementations that can run on ``backend`` (default: JAX's default backend)."""
    backend = jax.default_backend() if backend is None else backend
    fused = (Impl.CUDNN,) if backend in _GPU_BACKENDS else (Impl.SPLASH,) if backend == "tpu" else ()
    return (Impl.AUTO, Impl.REFERENCE, Impl.BLOCKWISE, Impl.XLA, *fused, Impl.SPLASH_INTERPRET)


def resolve_impl(
    impl: Impl | str = Impl.AUTO,
    *,
    q_len: int,
    kv_len: int,
    head_dim: int,
    dtype,
    causal: bool = True,
    window: int | None = None,
    custom_positions: bool = False,
    segment_ids: bool = False,
    return_lse: bool = False,
    backend: str | None = None,
) -> Impl:
    """The implementation ``dot_product_attention(impl=impl)`` runs for these shapes, arguments and backend.

    An explicit ``impl`` is returned as given once it is known to run here (else ``ValueError``: an unknown name, a
    fused kernel on the wrong backend, or arguments it cannot express). ``"auto"`` follows these rules, in order:

    1. ``q_len <= DENSE_MAX_QUERY_LEN`` -> REFERENCE (dense; decoding).
    2. GPU, default positions and segment ids, bf16/f16, ``head_dim % 8 == 0`` and ``<= 128``, ``q_len == kv_len``,
       causal if windowed, no lse requested -> CUDNN.
    3. TPU, default positions, ``q_len == kv_len``, both multiples of 128, no lse requested -> SPLASH.
    4. Otherwise BLOCKWISE. The fused kernels are skipped when ``return_lse``: their lse is not differentiable
       (cuDNN's is also rounded to the input dtype), while the blockwise lse is float32 and differentiable.
    """
    backend = jax.default_backend() if backend is None else backend
    impl = checks.require_choice("impl", impl, tuple(i.value for i in Impl))
    impl = Impl(impl)
    L, S, P = q_len, kv_len, head_dim
    if impl is Impl.AUTO:
        fused_ok = not custom_positions and not return_lse and L == S
        if L <= DENSE_MAX_QUERY_LEN:
            return Impl.REFERENCE
        if (backend in _GPU_BACKENDS and fused_ok and not segment_ids and dtype in (jnp.bfloat16, jnp.float16)
                and P % 8 == 0 and P <= 128 and (window is None or causal)):  # fmt: skip
            return Impl.CUDNN
        if backend == "tpu" and fused_ok and L % 128 == 0:
            return Impl.SPLASH
        return Impl.BLOCKWISE
    if impl not in available_impls(backend):
        device = "a GPU (cuDNN)" if impl is Impl.CUDNN else "a TPU"
        raise ValueError(f"impl={impl.value!r} needs {device}; the backend here is {backend!r}. Implementations "
                         f"available here: {', '.join(repr(i.value) for i in available_impls(backend))}")  # fmt: skip
    if impl in (Impl.CUDNN, Impl.SPLASH, Impl.SPLASH_INTERPRET):
        checks.require(not custom_positions, f"impl={impl.value!r} supports only default positions "
                       "(q_positions=kv_positions=None); use impl='blockwise' for custom positions")  # fmt: skip
    if impl is Impl.CUDNN:
        checks.require(not segment_ids, "impl='cudnn' does not support q_segment_ids/kv_segment_ids; use "
                       "impl='blockwise'")  # fmt: skip
        checks.require(window is None or causal, "impl='cudnn' supports a window only with causal=True")
    if impl in (Impl.SPLASH, Impl.SPLASH_INTERPRET):
        checks.require(L % 128 == 0 and S % 128 == 0, f"impl={impl.value!r} needs q length and kv length "
                       f"multiples of 128, got L={L}, S={S}")  # fmt: skip
    return impl


def dot_product_attention(
    q: Float[Array, "B L H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K P"],
    *,
    causal: bool = True,
    q_segment_ids: Int[Array, "B L"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    q_positions: Int[Array, "B L"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    window: int | None = None,
    scale: float | None = None,
    impl: Impl | str = Impl.AUTO,
    return_lse: bool = False,
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> Float[Array, "B L H P"] | tuple[Float[Array, "B L H P"], Float[Array, "B L H"]]:
    """Attention with one mask semantics (``lcjax.ops.masks``) and a choice of implementation.

    ``impl``: an ``Impl`` or its string value; ``resolve_impl`` says what runs (``"auto"``: its rules). All
    implementations agree with ``attention_reference`` on the arguments they accept, and refuse (ValueError) the ones
    they cannot express: CUDNN (GPU only) and SPLASH (TPU only) need default positions (the mask is index based),
    CUDNN also no segment ids and, with a window, causal. Caveats of the fused kernels: their lse (``return_lse``) is
    forward-only, and a query row that sees no key is not guaranteed to give 0 (splash averages v there);
    REFERENCE, BLOCKWISE and XLA give 0. ``block_q``/``block_kv`` are used by BLOCKWISE only.
    """
    inputs = masks.check_attention_inputs(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, window=window, scale=scale)  # fmt: skip
    has_segments = q_segment_ids is not None or kv_segment_ids is not None
    impl = resolve_impl(
        impl, q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[3], dtype=q.dtype, causal=causal, window=window,
        custom_positions=q_positions is not None or kv_positions is not None, segment_ids=has_segments,
        return_lse=return_lse,
    )  # fmt: skip
    scale = inputs.scale
    if impl is Impl.BLOCKWISE:
        return blockwise_checked(q, k, v, inputs, causal=causal, window=window, return_lse=return_lse,
                                 block_q=block_q, block_kv=block_kv)  # fmt: skip
    if impl is Impl.REFERENCE:
        out, lse = _dense_attention(q, k, v, inputs.mask(causal=causal, window=window), scale)
        return (out, lse) if return_lse else out
    if impl is Impl.XLA:
        return _jax_nn_attention(q, k, v, implementation="xla", mask_BLS=inputs.mask(causal=causal, window=window),
                                 causal=causal, window=window, scale=scale, return_lse=return_lse)  # fmt: skip
    if impl is Impl.CUDNN:
        return _jax_nn_attention(q, k, v, implementation="cudnn", mask_BLS=None, causal=causal, window=window,
                                 scale=scale, return_lse=return_lse)  # fmt: skip
    seg = (inputs.q_segment_ids, inputs.kv_segment_ids) if has_segments else (None, None)
    return _splash_attention(q, k, v, *seg, causal=causal, window=window, scale=scale, return_lse=return_lse,
                             interpret=impl is Impl.SPLASH_INTERPRET)
