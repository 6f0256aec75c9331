"""The sequential scan: the recurrence run one token at a time with `keras.ops.scan`.

The RNN view of the paper (Feng et al., arXiv 2405.13956, section 3.1): `aaren_step` in a loop,
O(T) depth. It is the form a stream runs, and the reference the parallel scans must equal.

Shape letters: B batch, T timesteps, H heads, D value dimension.
"""

from keras import ops

from keras_aaren.ops.recurrence import aaren_step, readout
from keras_aaren.ops.segments import per_row, reset_rows


def scan_sequential(scores, values, state, mask, starts=None):
    """Every prefix of the sequence, one token at a time, seeded with `state`.

    Masked tokens leave the state as it was; a token where a segment starts (`starts`, (B, T)
    bool) first empties it. scores: (B, T, H); values: (B, T, H, D); state: `(m, u, w)` in the
    scan dtype. Returns the outputs `(B, T, H, D)` and the final state.
    """
    if mask is None:
        mask = ops.ones(ops.shape(scores)[:2], dtype="bool")
    if starts is None:
        starts = ops.zeros(ops.shape(scores)[:2], dtype="bool")

    def step(carry, xs):
        score, value, keep, start = xs
        carry = reset_rows(carry, start)
        _, new = aaren_step(carry, score, value)
        carry = tuple(ops.where(per_row(keep, c), n, c) for n, c in zip(new, carry))
        # keras.ops.scan on TensorFlow wants the per-step output shaped like the carry, so emit
        # the state and read all of them out after the loop.
        return carry, carry

    xs = (
        ops.moveaxis(scores, 1, 0),
        ops.moveaxis(values, 1, 0),
        ops.moveaxis(mask, 1, 0),
        ops.moveaxis(starts, 1, 0),
    )
    final, states = ops.scan(step, tuple(state), xs)
    outputs = readout(states)  # (T, B, H, D)
    return ops.moveaxis(outputs, 0, 1), final
