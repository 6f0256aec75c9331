"""Context parallelism: one sequence's scan split along time across devices.

With a `SequenceSharding` (which `keras_aaren.distribution.ContextParallel` gives its layers),
each device holds 1/N of the time axis. The scan crosses time only through the state
$(m, u, w)$, so each shard

1. reduces its own tokens to the summary of its last segment, $(m, u, w)$ with
   $m = \\max s_i$, $u = \\sum e^{s_i - m}$, $w = \\sum e^{s_i - m} v_i$ over the real tokens after
   its last segment start (a plain reduction, no scan), and flags whether a segment starts in it;
2. all-gathers the N summaries, flags, and first and last segment ids: `batch × heads ×
   (2 + value_dim)` floats and three integers per row and shard, whatever the length (the ids
   show a segment that starts exactly on a shard border);
3. folds the summaries of the shards before it with ⊕ onto the initial state, starting afresh
   at a shard where a segment starts, which gives the state entering the shard;
4. runs the ordinary scan over its tokens from that state.

The final state is the last shard's. The backward pass is the same program differentiated: the
all-gather's transpose sends each shard the gradient of its summary (the suffix information),
and the local scan keeps its closed-form gradient. No token crosses a device.

The reduction and the fold are `keras.ops`; placing them on the devices is JAX's `shard_map`
(Keras' distribution API is JAX-only), so that plumbing stays in this module, beside the one
algorithm that needs it, rather than in `backend`, which serves every backend. PyTorch and
TensorFlow have no context parallelism here.

Shape letters: B batch, T timesteps, H heads, D value dimension, N shards.
"""

import dataclasses

import keras
from keras import ops

from keras_aaren.ops.recurrence import aaren_combine, lowest, scan_dtype
from keras_aaren.ops.segments import (
    final_state,
    in_last_segment,
    per_row,
    reset_rows,
    segment_starts,
)


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceSharding:
    """Where a scan's time axis is split: the devices along one axis of a Keras device mesh.

    Pass it to `keras_aaren.ops.aaren_scan` as `sharding`; under
    `keras_aaren.distribution.ContextParallel` the layers pass the one of its mesh
    (`ContextParallel.sequence_sharding`). JAX only, as `keras.distribution` is.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        sequence_axis: str, the mesh axis whose devices split the time axis.
        batch_axis: optional str, the mesh axis whose devices split the batch axis.

    Examples:
        >>> import keras
        >>> devices = [f"cpu:{i}" for i in range(4)]
        >>> mesh = keras.distribution.DeviceMesh((4,), ["sequence"], devices)
        >>> SequenceSharding(mesh, "sequence").num_shards
        4
    """

    device_mesh: keras.distribution.DeviceMesh
    sequence_axis: str
    batch_axis: str | None = None

    @property
    def num_shards(self):
        """How many devices share one sequence."""
        return dict(zip(self.device_mesh.axis_names, self.device_mesh.shape))[self.sequence_axis]


def shard_summary(scores, values, mask=None, starts=None):
    """The state of a shard's last segment, and whether a segment starts inside the shard.

    A reduction over the shard's tokens, no scan: the real tokens after the last start (all of
    them without a start) give $m = \\max s_i$, $u = \\sum e^{s_i - m}$ and
    $w = \\sum e^{s_i - m} v_i$; none gives the empty state (lowest, 0, 0).

    Args:
        scores: (B, T, H) in the scan dtype.
        values: (B, T, H, D) in the scan dtype.
        mask: (B, T) bool or None, True for a real token.
        starts: (B, T) bool or None, True where a segment starts inside the shard.

    Returns:
        `((m, u, w), has_start)`: shapes (B, H), (B, H), (B, H, D), and (B,) bool.
    """
    real = None if mask is None else mask
    has_start = ops.zeros(ops.shape(scores)[:1], dtype="bool")
    if starts is not None:
        last = in_last_segment(starts)
        real = last if real is None else ops.logical_and(real, last)
        has_start = ops.any(starts, axis=1)
    neg = lowest(scores.dtype)
    if real is None:
        m = ops.max(scores, axis=1)
        weights = ops.exp(scores - ops.stop_gradient(m)[:, None])
    else:
        keep = real[:, :, None]  # (B, T, 1)
        m = ops.max(ops.where(keep, scores, neg), axis=1)
        # The exponent is masked before exp, so that a masked token's gradient is 0, not NaN.
        weights = ops.exp(ops.where(keep, scores - ops.stop_gradient(m)[:, None], neg))
    # The running max carries no gradient: u and w scale with it, and their ratio does not.
    m = ops.stop_gradient(m)
    u = ops.sum(weights, axis=1)
    w = ops.sum(weights[..., None] * values, axis=1)
    return (m, u, w), has_start


def shard_message(scores, values, mask=None, segment_ids=None):
    """What a shard sends the others: the summary of its last segment, and where segments start.

    Args:
        scores: (B, T, H), the shard's scores.
        values: (B, T, H, D), its values.
        mask: (B, T) bool or None.
        segment_ids: (B, T) int or None.

    Returns:
        `(floats, ints)`: floats (B, H, 2 + D) in the scan dtype, `[m, u, w]` (`shard_summary`);
        ints (B, 3), `[a segment starts inside, first segment id, last segment id]`, or None
        without segment ids.
    """
    dtype = scan_dtype(values.dtype)
    starts = None if segment_ids is None else segment_starts(segment_ids)
    (m, u, w), has_start = shard_summary(
        ops.cast(scores, dtype), ops.cast(values, dtype), mask, starts
    )
    floats = ops.concatenate([m[..., None], u[..., None], w], axis=-1)
    if segment_ids is None:
        return floats, None
    flags = [ops.cast(has_start, segment_ids.dtype), segment_ids[:, 0], segment_ids[:, -1]]
    return floats, ops.stack(flags, axis=-1)


def scan_shard(local_scan, scores, values, initial, mask, segment_ids, floats, ints, index):
    """One shard's scan, once it has every shard's message.

    Args:
        local_scan: `fn(scores, values, initial_state, mask, segment_ids) -> (outputs, final)`,
            the one-device scan.
        scores, values, mask, segment_ids: the shard's tokens, as for `aaren_scan`.
        initial: the sequence's initial state `(m, u, w)` in the scan dtype.
        floats: (N, B, H, 2 + D), every shard's `shard_message` floats, in shard order.
        ints: (N, B, 3) or None, every shard's `shard_message` ints.
        index: int or scalar int tensor, this shard's position.

    Returns:
        `(outputs, final)`: the shard's outputs, and the state at its end; that of the last
        shard is the sequence's final state, as one device returns it.
    """
    summaries = (floats[..., 0], floats[..., 1], floats[..., 2:])
    count, rows = floats.shape[0], floats.shape[1]
    if ints is None:
        restarts = ops.zeros((count, rows), "bool")
        at_border = ops.zeros((rows,), "bool")
    else:
        # A segment starts on shard i's first token where its first id differs from shard
        # i - 1's last.
        border = ops.not_equal(ints[1:, :, 1], ints[:-1, :, 2])  # (N - 1, B)
        border = ops.concatenate([ops.zeros_like(border[:1]), border], axis=0)  # (N, B)
        restarts = ops.logical_or(ints[..., 0] > 0, border)
        at_border = ops.take(border, index, axis=0)  # (B,)
    entering = entering_state(initial, summaries, restarts, index)
    # A segment starting on this shard's first token starts from nothing seen.
    entering = reset_rows(entering, at_border)
    outputs, final = local_scan(scores, values, entering, mask, segment_ids)
    # A row whose last segment saw no real token ends, as on one device, in the initial state,
    # or in the empty one if a segment started anywhere in the sequence.
    return outputs, final_state(final, initial, ops.any(restarts, axis=0))


def entering_state(initial, summaries, restarts, index):
    """The state entering shard `index`: ⊕ of the shards before it, onto `initial`.

    A shard where a segment starts (`restarts`) contributes the summary of its last segment
    alone, dropping everything before it.

    Args:
        initial: `(m, u, w)` of shapes (B, H), (B, H), (B, H, D).
        summaries: `(m, u, w)` of all shards, with a leading axis N.
        restarts: (N, B) bool, a segment starts in that shard (on its first token included).
        index: int or scalar int tensor, this shard's position.

    Returns:
        The state `(m, u, w)` for the shard's first segment.
    """
    state = entering = tuple(initial)
    count = summaries[0].shape[0]
    for i in range(count - 1):
        summary = tuple(x[i] for x in summaries)
        joined = aaren_combine(state, summary)
        restart = restarts[i]  # (B,)
        state = tuple(ops.where(per_row(restart, s), s, j) for s, j in zip(summary, joined))
        entering = tuple(ops.where(ops.equal(index, i + 1), s, e) for s, e in zip(state, entering))
    return entering


def scan_context_parallel(local_scan, scores, values, initial_state, mask, segment_ids, sharding):
    """`local_scan` over a sequence whose time axis is split on `sharding`'s sequence axis.

    Each shard runs `shard_message`, one all-gather of the messages, and `scan_shard`, under
    `jax.shard_map` on the distribution's mesh (its devices may span processes).

    Args:
        local_scan: `fn(scores, values, initial_state, mask, segment_ids) -> (outputs, final)`,
            the one-device scan (`aaren_scan` without dispatch); it runs on each shard.
        scores, values, initial_state, mask, segment_ids: as for `aaren_scan`, tensors.
        sharding: a `SequenceSharding`.

    Returns:
        `(outputs, final_state)`, as `aaren_scan`.
    """
    import jax
    from jax.sharding import PartitionSpec

    mesh = sharding.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    seq = sharding.sequence_axis
    shards = sizes[seq]
    b, steps, h = scores.shape
    d = values.shape[-1]
    dtype = scan_dtype(values.dtype)
    if initial_state is None:
        initial_state = (
            ops.zeros((b, h), dtype),
            ops.zeros((b, h), dtype),
            ops.zeros((b, h, d), dtype),
        )
    initial_state = tuple(ops.cast(x, dtype) for x in initial_state)

    # A length that does not divide is padded with masked tokens continuing the last segment:
    # they change neither the real tokens' outputs nor the final state.
    pad = (-steps) % shards
    if pad:
        if mask is None:
            mask = ops.ones((b, steps), "bool")
        scores = ops.pad(scores, ((0, 0), (0, pad), (0, 0)))
        values = ops.pad(values, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = ops.pad(ops.cast(mask, "bool"), ((0, 0), (0, pad)), constant_values=False)
        if segment_ids is not None:
            last = ops.repeat(segment_ids[:, -1:], pad, axis=1)
            segment_ids = ops.concatenate([segment_ids, last], axis=1)
    if mask is not None:
        mask = ops.cast(mask, "bool")

    # Rows split on the batch axis where it divides the batch; otherwise every batch shard
    # computes all rows (the same result, done twice).
    batch = sharding.batch_axis
    if batch is not None and b % sizes[batch]:
        batch = None
    tokens = PartitionSpec(batch, seq)
    rows = PartitionSpec(batch)
    stacked = PartitionSpec(seq, batch)
    has_mask, has_ids = mask is not None, segment_ids is not None
    given = [x for x in (mask, segment_ids) if x is not None]

    def shard(scores, values, m0, u0, w0, *given):
        rest = iter(given)
        mask = next(rest) if has_mask else None
        ids = next(rest) if has_ids else None
        floats, ints = shard_message(scores, values, mask, ids)
        # The only exchange: B × H × (2 + D) floats and B × 3 integers per shard.
        floats = jax.lax.all_gather(floats, seq)
        ints = None if ints is None else jax.lax.all_gather(ints, seq)
        index = jax.lax.axis_index(seq)
        outputs, final = scan_shard(
            local_scan, scores, values, (m0, u0, w0), mask, ids, floats, ints, index
        )
        # Each shard's final state, stacked along the sequence axis; the last one is kept.
        return outputs, tuple(x[None] for x in final)

    run = jax.shard_map(
        shard,
        mesh=mesh.backend_mesh,
        in_specs=(tokens, tokens, rows, rows, rows, *(tokens for _ in given)),
        out_specs=(tokens, (stacked, stacked, stacked)),
    )
    outputs, final = run(scores, values, *initial_state, *given)
    final = tuple(x[-1] for x in final)
    if pad:
        outputs = outputs[:, :steps]
    return outputs, final
