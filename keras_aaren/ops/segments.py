"""Segments: several sequences packed in one row, each starting from "nothing seen".

A token whose segment id differs from the previous token's starts a segment (`segment_starts`).
Every algorithm, the context-parallel path, the layers' masked outputs and the streaming reset
express a segment through the few functions here:

* the operator: `combine_unless` is ⊕, except that a restart drops what came before;
* counts of starts along time (`segment_index`, `after_first_start`, `before_last_start`,
  `in_last_segment`), which say which tokens share a segment without a loop;
* per-row flags applied to states (`per_row`, `reset_rows`, `final_state`).

Shape letters: B batch, T timesteps, H heads, D value dimension.
"""

from keras import ops

from keras_aaren.ops.recurrence import combine_scales, larger


def segment_starts(segment_ids):
    """(B, T) bool: True where a token's segment id differs from the previous token's.

    The first token is not a start: it continues whatever state the scan begins from.
    """
    changed = ops.not_equal(segment_ids[:, 1:], segment_ids[:, :-1])
    return ops.concatenate([ops.zeros_like(segment_ids[:, :1], dtype="bool"), changed], axis=1)


def segment_index(starts):
    """How many segments have started up to and including each token, along the last axis
    (int32): tokens of one index lie in one segment; index 0 is the one the scan begins in."""
    return ops.cumsum(ops.cast(starts, "int32"), axis=-1)


def after_first_start(starts):
    """True from the first segment start on (last axis): the tokens the initial state does not
    reach."""
    return segment_index(starts) > 0


def before_last_start(starts):
    """True up to and including the last segment start (last axis): `after_first_start` read
    from the end, for a scan of suffixes."""
    index = segment_index(starts)
    return index < index[..., -1:] + ops.cast(starts, "int32")


def in_last_segment(starts):
    """True for the tokens of each row's last segment (last axis): those the final state holds."""
    index = segment_index(starts)
    return ops.equal(index, index[..., -1:])


def per_row(flag, x):
    """A per-row flag `(B,)` or `(B, 1)` shaped to broadcast against `x` `(B, ...)`."""
    return ops.reshape(flag, (-1,) + (1,) * (len(x.shape) - 1))


def reset_rows(state, restart):
    """`state` (a sequence of `(B, ...)` tensors) with the rows where `restart` `(B,)` holds set
    to the empty state, zeros, which every function of the package reads as "nothing seen"."""
    return type(state)(ops.where(per_row(restart, x), ops.zeros_like(x), x) for x in state)


def final_state(final, start, restarted=None):
    """The state a scan ends in, per row: `final` where the last segment saw a real token, else
    the state the scan started from, or the empty state if a segment started after it.

    An RNN that skips its masked steps ends where it started; a segment start empties the state
    whether or not a real token follows.

    Args:
        final: `(m, u, w)` the scan computed, of shapes (B, H), (B, H), (B, H, D).
        start: `(m, u, w)` it started from, of the same shapes.
        restarted: (B,) bool or None, a segment started in the row.

    Returns:
        The final `(m, u, w)`.
    """
    if restarted is not None:
        start = reset_rows(tuple(start), restarted)
    seen = final[1] > 0  # (B, H)
    return tuple(
        ops.where(seen if len(f.shape) == 2 else seen[..., None], f, s)
        for f, s in zip(final, start)
    )


def combine_unless(restart, state_a, state_b):
    """`state_a ⊕ state_b`, or `state_b` alone where `restart` (a segment starts within B).

    The same work as ⊕: `restart` zeroes A's weight (`combine_scales`), so no tensor of B's
    full size (`(..., H, D)`) is selected afterwards.

    Args:
        restart: bool, broadcastable to the shape of m.
        state_a: `(m, u, w)` of shapes `(..., H)`, `(..., H)`, `(..., H, D)`.
        state_b: the same structure, broadcastable against `state_a`.

    Returns:
        The combined state `(m, u, w)`.
    """
    m_a, u_a, w_a = state_a
    m_b, u_b, w_b = state_b
    m, scale_a, scale_b = combine_scales(m_a, u_a, m_b, u_b, restart)
    u = u_a * scale_a + u_b * scale_b
    w = w_a * scale_a[..., None] + w_b * scale_b[..., None]
    return m, u, w


def combine_segments(a, b):
    """⊕ on leaves lifted with a segment flag, `(m, u, w, started)`: `b` alone where a segment
    starts in it, and the flag is an OR. The lifted operator stays associative."""
    *state_a, started_a = a
    *state_b, started_b = b
    state = combine_unless(started_b > 0, state_a, state_b)
    return (*state, larger(started_a, started_b))


def carry_last_real(outputs, mask, before, starts=None):
    """Each step's output replaced by that of the last real step of its segment up to it.

    What `keras.layers.RNN` outputs at a masked step (the previous output), for outputs computed
    at every step at once. Before its segment's first real step, a step outputs `before` in the
    first segment and zeros in the others, as each segment would alone.

    Args:
        outputs: (B, T, O).
        mask: (B, T) bool, True for a real step.
        before: (B, O), the output before the call's first real step.
        starts: optional (B, T) bool, True at a segment's first token.

    Returns:
        A tuple `(carried, seen, first)`: the outputs (B, T, O), whether each step's segment
        has seen a real token up to it (B, T), and whether it is the first segment (B, T).
    """
    count = ops.cumsum(ops.cast(mask, "int32"), axis=1)  # (B, T) real steps up to each
    source = ops.take_along_axis(_in_order(mask), ops.maximum(count - 1, 0), axis=1)
    index = ops.repeat(source[..., None], outputs.shape[-1], axis=-1)  # (B, T, O)
    carried = ops.take_along_axis(outputs, index, axis=1)
    if starts is None:
        seen, first = count > 0, ops.ones_like(mask)
    else:
        # Real steps before a step's segment: the count just before the segment's first token.
        segment = segment_index(starts)  # (B, T)
        start = ops.take_along_axis(_in_order(starts), ops.maximum(segment - 1, 0), axis=1)
        before_segment = ops.take_along_axis(count - ops.cast(mask, "int32"), start, axis=1)
        first = segment == 0
        seen = count > ops.where(first, 0, before_segment)
    otherwise = ops.where(
        first[..., None], ops.cast(before, carried.dtype)[:, None], ops.zeros_like(carried)
    )
    return ops.where(seen[..., None], carried, otherwise), seen, first


def _in_order(flags):
    """(B, T) bool -> (B, T) int: the positions where `flags` holds, in order, then the rest.

    Sorting flagged positions before the others (keys are unique) lists them in order: the c-th
    flagged position is entry c - 1. A sort and a gather, so it compiles under XLA like the scan.
    """
    steps = ops.shape(flags)[1]
    position = ops.arange(steps)
    return ops.argsort(ops.where(flags, position, position + steps), axis=1)
