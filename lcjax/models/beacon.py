"""Activation Beacon language model: a base ``LM`` plus beacon parameters, processed window by window.

"Long Context Compression with Activation Beacon" (Zhang et al., ICLR 2025; v1: "Soaring from 4K to 400K"),
https://arxiv.org/abs/2401.03462; reference code FlagOpen/FlagEmbedding ``research/Long_LLM/activation_beacon/
src/modeling_beacon.py`` (``Memory.prepare/step/update_memory``), v1 in ``old/src/activation_beacon_llama/``.

``add_beacons(base_lm, cfg, rngs=...)`` wraps an attention-only ``LM`` (e.g. from ``lcjax.convert.llama``): beacon
q/k/v(/o) projections start as copies of the base ones, the beacon embedding as a chosen token's embedding, and the
base weights are never written. ``beacon_lm(tokens_BL)`` returns logits for every raw token like ``LM``.

Streaming (``BeaconState``): per layer ``[sink; beacon memory; raw K/V of the current window]`` in fixed-capacity
buffers with per-example counts, keys cached before RoPE and rotated every step by ``arange`` over the valid
entries. A call feeds any number of tokens; they are processed in sub-steps that never cross a window boundary;
when a window completes its raw K/V are dropped and only its beacons kept, so the state holds
``sink + W/r · (completed windows) + W + W/r`` entries: O(window + L/ratio). One-shot, chunked and token-by-token
feeding compute the same function. Unlike upstream (batch size 1, last window's logits only), batches are padded
on the right with per-example ``lengths_B`` and ratio schedules ``ratios_BN`` (one ratio per example and window).
Dimension key (lcjax/typing.py): B batch, L/T tokens, U chunk slots, N windows, D model, V vocab, K kv heads,
P head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax import checks, sharding
from lcjax.layers.beacon import BeaconAttention, BeaconConfig, BeaconParam, ChunkLayout, KeyMask, beacon_param
from lcjax.layers.beacon import chunk_layout
from lcjax.models.lm import LM, check_prompt, check_sampling_args, sample_logits
from lcjax.typing import Array, ArrayLike, Float, Int

__all__ = ["BeaconLM", "BeaconParam", "BeaconState", "add_beacons", "generate"]


class BeaconLayerState(NamedTuple):
    """One layer's cached K/V (before RoPE): sink [B, s, K, P], memory [B, M, K, P], raw window cache [B, R, K, P]."""

    sink_k: jax.Array
    sink_v: jax.Array
    mem_k: jax.Array
    mem_v: jax.Array
    raw_k: jax.Array
    raw_v: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["layers", "raw_is_beacon", "n_mem", "n_raw", "filled", "window", "length", "ratios", "capacity"],
    meta_fields=["ratio_set"],
)
@dataclasses.dataclass(frozen=True)
class BeaconState:
    """Streaming state. Per example [B]: ``n_mem`` memory entries, ``n_raw`` raw-cache entries (raw tokens and, for
    interleave, beacons of the current window), ``filled`` raw tokens of the current window, ``window`` completed
    windows, ``length`` tokens consumed. ``raw_is_beacon`` [B, R] marks beacon entries of the raw cache, ``ratios``
    [B, N] is each window's ratio, ``capacity`` the most tokens the buffers hold. ``ratio_set`` (static): the
    ratios the buffers are sized for."""

    layers: tuple[BeaconLayerState, ...]
    raw_is_beacon: jax.Array
    n_mem: jax.Array
    n_raw: jax.Array
    filled: jax.Array
    window: jax.Array
    length: jax.Array
    ratios: jax.Array
    capacity: jax.Array
    ratio_set: tuple[int, ...]

    def memory_entries(self, sink_size: int) -> jax.Array:
        """Cached K/V entries per layer and example [B]: sink (once the first window completed) + memory + raw."""
        return jnp.where(self.window > 0, sink_size, 0) + self.n_mem + self.n_raw


def _concrete(x) -> np.ndarray | None:
    """``x`` as numpy when it is a concrete value, None under tracing."""
    return np.asarray(x) if checks.is_concrete(x) else None


def _check_int_array(name: str, x: jax.Array, shape: tuple[int, ...], axes: str) -> None:
    checks.require(x.shape == shape and jnp.issubdtype(x.dtype, jnp.integer),
                   f"{name} must be an int array of shape {shape} {axes}, got {x.dtype}{x.shape}")  # fmt: skip


_KV = ("act_batch", None, "act_kv_heads", None)


def _scatter_rows(buf_BS, dest_BU, val_BU, logical=_KV):
    """``buf[b, dest[b, u]] = val[b, u]``; destinations out of range are dropped. ``logical``: the buffer's axes
    (the output sharding under a mesh)."""
    if buf_BS.shape[1] == 0:  # e.g. no sink: nothing to write (and an empty scatter has no transpose rule)
        return buf_BS
    b_BU = jnp.broadcast_to(jnp.arange(buf_BS.shape[0], dtype=jnp.int32)[:, None], dest_BU.shape)
    out = sharding.pspec(*logical) if sharding.mesh_active() else None
    return buf_BS.at[b_BU, dest_BU].set(val_BU.astype(buf_BS.dtype), mode="drop", out_sharding=out)


def _split_kv(y_BUD, k_BUKP, v_BUKP):
    """``BeaconAttention``'s ``(y, k, v)`` as the ``(y, aux)`` that ``AttentionBlock.residual`` expects."""
    return y_BUD, (k_BUKP, v_BUKP)


def _take_rows(x_BU, idx_BT):
    """``x[b, idx[b, t]]`` along axis 1 (trailing axes kept)."""
    idx = idx_BT.reshape(idx_BT.shape + (1,) * (x_BU.ndim - 2))
    return jnp.take_along_axis(x_BU, idx, axis=1)


class BeaconLM(nnx.Module):
    """A base ``LM`` with beacon parameters (``BeaconParam``): ``beacon_embed_tokens`` [1, D] and, per layer,
    ``beacon_layers[i]`` (``BeaconAttention``). ``base`` is the wrapped model, whose variables this module owns."""

    def __init__(self, base: LM, cfg: BeaconConfig, *, rngs: nnx.Rngs):
        lm_cfg = base.cfg
        checks.require(set(lm_cfg.block_pattern) == {"attention"},
                       f"add_beacons: base LMConfig.block_pattern={lm_cfg.block_pattern} must be attention-only")
        checks.require(not lm_cfg.scan_layers,
                       "add_beacons: base LMConfig.scan_layers must be False (layers are run one by one)")
        checks.require(lm_cfg.window is None,
                       f"add_beacons: base LMConfig.window={lm_cfg.window}: sliding-window bases are not supported")
        checks.require(lm_cfg.rope.rope_type not in ("dynamic", "longrope"),
                       f"add_beacons: base RoPE rope_type={lm_cfg.rope.rope_type!r} switches frequencies on the sequence "
                       "length; beacon chunks use fixed frequencies (allowed: default, linear, yarn, llama3)")  # fmt: skip
        checks.require(lm_cfg.rope.partial_rotary_factor == 1.0 and not lm_cfg.qk_norm,
                       "add_beacons: bases with partial rotary embeddings or QK-norm are not supported")
        cfg.check_model(lm_cfg.max_seq_len)
        self.cfg = cfg
        self.base = base
        pd = jnp.dtype(lm_cfg.param_dtype)
        if cfg.embed_init == "random":
            init = nnx.initializers.normal(0.02)(rngs.params(), (1, lm_cfg.d_model), pd)
        else:
            checks.require(cfg.embed_init < lm_cfg.vocab_size,
                           f"BeaconConfig.embed_init={cfg.embed_init} must be < vocab_size={lm_cfg.vocab_size}")
            ids = jnp.full((1,), cfg.embed_init, jnp.int32)
            init = jnp.copy(sharding.take(sharding.read(base.embed_tokens.weight), ids, out=(None, "embed")))
        self.beacon_embed_tokens = beacon_param(init, None, "embed")
        self.beacon_layers = nnx.List([BeaconAttention(blk.self_attn, cfg) for blk in base.layers])

    # ---- state --------------------------------------------------------------------------------------------
    def init_state(
        self, batch: int, max_len: int, *, ratios_BN: Int[ArrayLike, "B N"] | None = None, dtype=None
    ) -> BeaconState:
        """An empty state for ``batch`` sequences of up to ``max_len`` tokens.

        ``ratios_BN`` [batch, ceil(max_len / W)] gives each window's ratio (default: ``cfg.ratio`` everywhere); every
        value must be one of ``cfg.ratios``. The buffers are sized for the ratios the schedule holds when it is
        concrete (so inference at ratio r keeps ``W/r`` entries per window whatever the training mix), for every
        ratio of ``cfg.ratios`` when it is traced (training).
        """
        cfg, lm_cfg = self.cfg, self.base.cfg
        checks.require_int("init_state: batch", batch, min=1)
        checks.require_int("init_state: max_len", max_len, min=1)
        W = cfg.window
        n_windows = -(-max_len // W)
        if ratios_BN is None:
            ratios_BN = jnp.full((batch, n_windows), cfg.ratio, jnp.int32)
        ratios_BN = jnp.asarray(ratios_BN)
        _check_int_array("ratios_BN", ratios_BN, (batch, n_windows), "(batch, windows)")
        values = _concrete(ratios_BN)
        checks.require(values is None or bool(np.isin(values, cfg.ratios).all()),
                       f"ratios_BN: values {sorted(set(np.ravel(values)) - set(cfg.ratios))} are not in "
                       f"BeaconConfig ratios {cfg.ratios}")  # fmt: skip
        ratio_set = cfg.ratios if values is None else tuple(sorted({int(r) for r in values.ravel()}))
        dtype = jnp.dtype(lm_cfg.dtype) if dtype is None else dtype
        M = (max_len // W) * cfg.memory_growth(ratio_set)
        R = W + cfg.max_beacons(ratio_set)
        kv = lambda n: sharding.shard(jnp.zeros((batch, n, lm_cfg.n_kv_heads, lm_cfg.head_dim), dtype), "act_batch",
                                      None, "act_kv_heads", None)  # fmt: skip
        layer = lambda: BeaconLayerState(*(kv(n) for n in (cfg.sink_size,) * 2 + (M,) * 2 + (R,) * 2))
        z = lambda: sharding.shard(jnp.zeros((batch,), jnp.int32), "act_batch")
        return BeaconState(
            layers=tuple(layer() for _ in range(lm_cfg.n_layers)),
            raw_is_beacon=sharding.shard(jnp.zeros((batch, R), bool), "act_batch", None), n_mem=z(), n_raw=z(),
            filled=z(), window=z(), length=z(), ratios=sharding.shard(ratios_BN.astype(jnp.int32), "act_batch", None),
            capacity=jnp.asarray(max_len, jnp.int32), ratio_set=ratio_set,
        )  # fmt: skip

    # ---- forward --------------------------------------------------------------------------------------------
    def __call__(
        self, tokens_BL: Int[ArrayLike, "B L"], *, lengths_B: Int[ArrayLike, " B"] | None = None,
        ratios_BN: Int[ArrayLike, "B N"] | None = None, state: BeaconState | None = None,
    ) -> Float[Array, "B L V"] | tuple[Float[Array, "B L V"], BeaconState]:  # fmt: skip
        """Logits [B, L, V] (float32) of the raw tokens; with a ``state``, ``(logits, new_state)``.

        ``lengths_B``: real tokens per row (right padding; default L); logits of padding rows are 0. Without a state
        the whole sequence runs from an empty one (``ratios_BN`` as in ``init_state``; gradients flow through every
        window's beacons). With a state the tokens continue each row's stream; its ratios were fixed by
        ``init_state``. Tokens beyond the state's capacity give NaN logits (checked eagerly when not traced).
        """
        tokens_BL = jnp.asarray(tokens_BL)
        checks.require(tokens_BL.ndim == 2 and jnp.issubdtype(tokens_BL.dtype, jnp.integer) and tokens_BL.size > 0,
                       f"BeaconLM: tokens must be an int [batch, length >= 1] array, got "
                       f"{tokens_BL.dtype}{tokens_BL.shape}")  # fmt: skip
        checks.check_token_ids("BeaconLM: tokens_BL", tokens_BL, self.base.cfg.vocab_size)
        B, L = tokens_BL.shape
        if lengths_B is None:
            lengths_B = jnp.full((B,), L, jnp.int32)
        lengths_B = jnp.asarray(lengths_B)
        _check_int_array("lengths_B", lengths_B, (B,), "(batch,)")
        lengths = _concrete(lengths_B)
        checks.require(lengths is None or bool(((lengths >= 0) & (lengths <= L)).all()),
                       f"lengths_B={np.asarray(lengths).tolist()} must lie in [0, {L}]")  # fmt: skip
        if state is None:
            logits_BLV, _ = self._feed(self.init_state(B, L, ratios_BN=ratios_BN), tokens_BL, lengths_B, fresh=True)
            return logits_BLV
        checks.require(ratios_BN is None, "ratios_BN: when streaming, give the ratio schedule to init_state")
        checks.require(state.n_mem.shape == (B,), f"state holds {state.n_mem.shape[0]} sequences, tokens {B}")
        used, cap = _concrete(state.length), _concrete(state.capacity)
        if used is not None and cap is not None and lengths is not None:
            checks.require(not (used + lengths > cap).any(), f"BeaconLM: {(used + lengths).max()} tokens exceed "
                           f"the state's capacity {int(cap)} (init_state max_len)")  # fmt: skip
        return self._feed(state, tokens_BL, lengths_B)

    def _feed(self, state: BeaconState, tokens_BT, lengths_B, *, fresh: bool = False):
        """Sub-steps that each extend every row's current window without crossing its end (a ``lax.scan``).

        From an empty state (``fresh``, the one-shot forward) windows line up with the input: ``ceil(T / W)``
        sub-steps. Otherwise ``1 + ceil((T - 1) / W)`` cover any fill of the current window, and a sub-step in which
        no row has tokens left is skipped (``lax.cond``).
        """
        W = self.cfg.window
        B, T = tokens_BT.shape
        T_sub = min(T, W)
        n_sub = -(-T // W) if fresh else 1 + -(-(T - 1) // W)
        tokens_BT = sharding.shard(tokens_BT.astype(jnp.int32), "act_batch", None)
        lengths_B = sharding.shard(lengths_B.astype(jnp.int32), "act_batch")

        def body(carry, _):
            state, c_B = carry
            take_B = jnp.clip(jnp.minimum(lengths_B - c_B, W - state.filled), 0, T_sub)
            idx_BT = jnp.clip(c_B[:, None] + jnp.arange(T_sub, dtype=jnp.int32)[None, :], 0, T - 1)
            run = lambda state: self._step(state, jnp.take_along_axis(tokens_BT, idx_BT, axis=1), take_B)
            if fresh or n_sub == 1:
                logits_BtV, state = run(state)
            else:
                V = self.base.cfg.vocab_size
                skip = lambda state: (sharding.shard(jnp.zeros((B, T_sub, V), jnp.float32), "act_batch", None,
                                                     "act_vocab"), state)  # fmt: skip
                logits_BtV, state = jax.lax.cond(jnp.any(take_B > 0), run, skip, state)
            return (state, c_B + take_B), (logits_BtV, c_B, take_B)

        if self.base.cfg.remat:
            body = jax.checkpoint(body)
        carry = (state, sharding.shard(jnp.zeros((B,), jnp.int32), "act_batch"))
        if n_sub == 1:
            (state, _), out = body(carry, None)
            out = jax.tree.map(lambda a: a[None], out)
        else:
            (state, _), out = jax.lax.scan(body, carry, None, length=n_sub)
        logits_NBtV, c_NB, take_NB = out
        t_1t = jnp.arange(T_sub, dtype=jnp.int32)[None, None, :]
        dest_NBt = jnp.where(t_1t < take_NB[..., None], c_NB[..., None] + t_1t, T)
        V = logits_NBtV.shape[-1]
        dest_BX = jnp.moveaxis(dest_NBt, 0, 1).reshape(B, n_sub * T_sub)
        vals_BXV = jnp.moveaxis(logits_NBtV, 0, 1).reshape(B, n_sub * T_sub, V)
        zeros_BTV = sharding.shard(jnp.zeros((B, T, V), jnp.float32), "act_batch", None, "act_vocab")
        logits_BTV = _scatter_rows(zeros_BTV, dest_BX, vals_BXV, ("act_batch", None, "act_vocab"))
        return logits_BTV, state

    def _step(self, state: BeaconState, tokens_BT, n_B):
        """One chunk of ``n_B <= W - filled`` raw tokens per row: interleave/append beacons, run every layer over
        ``[sink; memory; raw cache; chunk]``, then cache the chunk and compress completed windows."""
        cfg, lm = self.cfg, self.base
        B, T = tokens_BT.shape
        n_windows = state.ratios.shape[1]
        ratio_B = jnp.take_along_axis(state.ratios, jnp.clip(state.window, 0, n_windows - 1)[:, None], axis=1)[:, 0]
        lay = chunk_layout(cfg, T, n_B, state.filled, ratio_B, state.ratio_set)
        dt = jnp.dtype(lm.cfg.dtype)

        tok_BU = jnp.take_along_axis(tokens_BT, lay.token_index, axis=1)
        x_BUD = lm.embed_tokens(tok_BU, dtype=dt)
        beacon_11D = sharding.read(self.beacon_embed_tokens, dt)[None]
        x_BUD = jnp.where(lay.is_beacon[:, :, None], beacon_11D, x_BUD)
        x_BUD = sharding.shard(x_BUD, "act_batch", None, "act_embed")

        kv_pos_BS, q_pos_BU, mask = self._positions_and_mask(state, lay, ratio_B)
        new_kv = []
        for blk, beacon_attn, ls in zip(lm.layers, self.beacon_layers, state.layers, strict=True):
            cache_k = jnp.concatenate([ls.sink_k, ls.mem_k, ls.raw_k], axis=1)
            cache_v = jnp.concatenate([ls.sink_v, ls.mem_v, ls.raw_v], axis=1)
            attend = lambda h_BUD: _split_kv(*beacon_attn(blk.self_attn, h_BUD, lay.is_beacon, cache_k, cache_v,
                                                          kv_pos_BS, q_pos_BU, mask))  # fmt: skip
            x_BUD, kv = blk.residual(x_BUD, attend)  # the base block's residual structure, beacon attention inside
            x_BUD = sharding.shard(x_BUD, "act_batch", None, "act_embed")
            new_kv.append(kv)

        logits_BTV = lm.head(_take_rows(x_BUD, jnp.clip(lay.raw_slot, 0, x_BUD.shape[1] - 1)), seq=None)
        overflow_B = state.length + n_B > state.capacity
        logits_BTV = jnp.where(overflow_B[:, None, None], jnp.nan, logits_BTV)
        return logits_BTV, self._update(state, lay, new_kv, ratio_B, n_B)

    def _positions_and_mask(self, state: BeaconState, lay: ChunkLayout, ratio_B):
        """RoPE positions of keys ``[sink; memory; raw cache; chunk]`` and queries, and the attention mask."""
        cfg = self.cfg
        B, U = lay.valid.shape
        s = cfg.sink_size
        M = state.layers[0].mem_k.shape[1]
        R = state.layers[0].raw_k.shape[1]
        sink_valid = jnp.broadcast_to((state.window > 0)[:, None], (B, s))
        mem_valid = jnp.arange(M)[None, :] < state.n_mem[:, None]
        raw_valid = jnp.arange(R)[None, :] < state.n_raw[:, None]
        cache_valid = jnp.concatenate([sink_valid, mem_valid, raw_valid], axis=1)
        kv_valid = jnp.concatenate([cache_valid, lay.valid], axis=1)
        kv_pos_BS = jnp.maximum(jnp.cumsum(kv_valid, axis=1, dtype=jnp.int32) - 1, 0)
        S = s + M + R
        q_pos_BU = kv_pos_BS[:, S:]
        if cfg.scheme == "interleave":
            mask = KeyMask(
                q_order=jnp.broadcast_to(S + jnp.arange(U, dtype=jnp.int32)[None], (B, U)),
                kv_order=jnp.broadcast_to(jnp.arange(S + U, dtype=jnp.int32)[None], (B, S + U)),
                kv_segment=jnp.where(kv_valid, 0, -1).astype(jnp.int32), dense=None,
            )  # fmt: skip
            return kv_pos_BS, q_pos_BU, mask
        # step-expansion: beacon i sits right after its last covered raw token, M + (i + 1) * r. The layout comes
        # from the host (replicated); the selects below need it batch-sharded like the state under a mesh.
        is_beacon_BU, reach_BU, widx_BU = (sharding.shard(a, "act_batch", None) for a in (lay.is_beacon, lay.reach,
                                                                                           lay.widx))  # fmt: skip
        n_before_B = jnp.where(state.window > 0, s, 0) + state.n_mem
        q_pos_BU = jnp.where(is_beacon_BU, n_before_B[:, None] + (lay.beacon + 1) * ratio_B[:, None], q_pos_BU)
        kv_pos_BS = jnp.concatenate([kv_pos_BS[:, :S], q_pos_BU], axis=1)
        reach_BU1 = reach_BU[:, :, None]
        raw_idx_11R = jnp.arange(R)[None, None, :]  # v1 raw caches hold raw tokens only: slot j = window index j
        vis_mem = jnp.broadcast_to(jnp.concatenate([sink_valid, mem_valid], axis=1)[:, None], (B, U, s + M))
        vis_raw = raw_valid[:, None, :] & (raw_idx_11R <= reach_BU1)
        same_slot = jnp.arange(U)[None, :, None] == jnp.arange(U)[None, None, :]
        vis_chunk = lay.valid[:, None, :] & jnp.where(
            is_beacon_BU[:, None, :], same_slot, widx_BU[:, None, :] <= reach_BU1
        )
        dense = jnp.concatenate([vis_mem, vis_raw, vis_chunk], axis=2)
        return kv_pos_BS, q_pos_BU, KeyMask(q_order=None, kv_order=None, kv_segment=None, dense=dense)

    def _update(self, state: BeaconState, lay: ChunkLayout, new_kv, ratio_B, n_B) -> BeaconState:
        """Append the chunk to the raw cache; for completed windows move beacons (all raw K/V for ratio 0) to the
        memory, fill the sink from the first window, and empty the raw cache."""
        s = self.cfg.sink_size
        M = state.layers[0].mem_k.shape[1]
        R = state.layers[0].raw_k.shape[1]
        rank_BU = jnp.cumsum(lay.valid, axis=1, dtype=jnp.int32) - 1
        dest_BU = jnp.where(lay.valid, state.n_raw[:, None] + rank_BU, R)
        raw_is_beacon = _scatter_rows(state.raw_is_beacon, dest_BU, lay.is_beacon, ("act_batch", None))
        n_raw = state.n_raw + jnp.sum(lay.valid, axis=1, dtype=jnp.int32)

        done_B1 = lay.completes[:, None]
        in_raw = jnp.arange(R)[None, :] < n_raw[:, None]
        is_raw = in_raw & ~raw_is_beacon
        raw_rank = jnp.cumsum(is_raw, axis=1, dtype=jnp.int32) - 1
        in_sink = (state.window == 0)[:, None] & is_raw & (raw_rank < s)
        kept = jnp.where(ratio_B[:, None] > 0, in_raw & raw_is_beacon, is_raw) & ~in_sink
        mem_dest = jnp.where(kept & done_B1, state.n_mem[:, None] + jnp.cumsum(kept, axis=1, dtype=jnp.int32) - 1, M)
        sink_dest = jnp.where(in_sink & done_B1, raw_rank, s)

        layers = []
        for ls, (k_BUKP, v_BUKP) in zip(state.layers, new_kv, strict=True):
            raw_k = _scatter_rows(ls.raw_k, dest_BU, k_BUKP)
            raw_v = _scatter_rows(ls.raw_v, dest_BU, v_BUKP)
            layers.append(BeaconLayerState(
                sink_k=_scatter_rows(ls.sink_k, sink_dest, raw_k), sink_v=_scatter_rows(ls.sink_v, sink_dest, raw_v),
                mem_k=_scatter_rows(ls.mem_k, mem_dest, raw_k), mem_v=_scatter_rows(ls.mem_v, mem_dest, raw_v),
                raw_k=raw_k, raw_v=raw_v,
            ))  # fmt: skip
        done_B = lay.completes
        return dataclasses.replace(
            state, layers=tuple(layers), raw_is_beacon=raw_is_beacon,
            n_mem=state.n_mem + jnp.where(done_B, jnp.sum(kept, axis=1, dtype=jnp.int32), 0),
            n_raw=jnp.where(done_B, 0, n_raw), filled=jnp.where(done_B, 0, state.filled + n_B),
            window=state.window + done_B.astype(jnp.int32), length=state.length + n_B,
        )  # fmt: skip


def add_beacons(base_lm: LM, cfg: BeaconConfig, *, rngs: nnx.Rngs) -> BeaconLM:
    """A ``BeaconLM`` over ``base_lm``: beacon projections copied from the base ones, the beacon embedding from token
    ``cfg.embed_init`` (``rngs`` is used only for ``embed_init="random"``). ``base_lm``'s weights are not changed;
    the returned model holds ``base_lm`` itself (no copy), so donate it only where ``base_lm`` is no longer used."""
    return BeaconLM(base_lm, cfg, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def generate(
    model: BeaconLM, prompt_BL: Int[ArrayLike, "B L"], *, max_new_tokens: int,
    lengths_B: Int[ArrayLike, " B"] | None = None, ratios_BN: Int[ArrayLike, "B N"] | None = None,
    temperature: float = 0.0, top_k: int | None = None, rng: jax.Array | None = None,
) -> Int[Array, "B new"]:  # fmt: skip
    """Greedy (``temperature=0``) or sampled continuation through the beacon state: prefill of the (right-padded,
    ``lengths_B``) prompts, then one streaming step per token; each row continues from its own length. Tokens are
    drawn by ``lcjax.models.lm.sample_logits`` (the one sampler of every lcjax ``generate``).

    Returns the ``max_new_tokens`` new tokens [B, max_new_tokens]. Memory stays O(W + (L + N) / ratio).
    """
    check_sampling_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, rng=rng,
                        vocab_size=model.base.cfg.vocab_size)  # fmt: skip
    prompt_BL = check_prompt(prompt_BL, model.base.cfg.vocab_size)
    B, L = prompt_BL.shape
    lengths_B = jnp.full((B,), L, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
    lengths = _concrete(lengths_B)
    checks.require(lengths_B.shape == (B,) and (lengths is None or bool(((lengths >= 1) & (lengths <= L)).all())),
                   f"generate: lengths_B must have shape {(B,)} with values in [1, {L}]")  # fmt: skip
    state = model.init_state(B, L + max_new_tokens, ratios_BN=ratios_BN)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(model, prompt_BL, lengths_B, state, rng, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k)  # fmt: skip


@sharding.jit(static_argnames=("max_new_tokens", "temperature", "top_k"))  # the active rules key the cache
def _generate(model, prompt_BL, lengths_B, state, rng, *, max_new_tokens, temperature, top_k):
    B = prompt_BL.shape[0]
    pick = functools.partial(sample_logits, temperature=temperature, top_k=top_k)

    logits_BLV, state = model(prompt_BL, lengths_B=lengths_B, state=state)
    last_BV = jnp.take_along_axis(logits_BLV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    keys = jax.random.split(rng, max_new_tokens)
    first_B = pick(last_BV, keys[0])
    ones_B = jnp.ones((B,), jnp.int32)

    def step(carry, key):
        token_B, state = carry
        logits_B1V, state = model(token_B[:, None], lengths_B=ones_B, state=state)
        return (pick(logits_B1V[:, 0], key), state), token_B

    (last_B, _), tokens_NB = jax.lax.scan(step, (first_B, state), keys[1:])
    return jnp.concatenate([tokens_NB.T, last_B[:, None]], axis=1)
