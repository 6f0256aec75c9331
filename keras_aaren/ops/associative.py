"""The paper's parallel prefix scan: `keras.ops.associative_scan` with the ⊕ operator.

Every prefix state is the ⊕-reduction of the leaves before it, so a work-efficient parallel scan
computes all of them in O(log T) depth (Feng et al., arXiv 2405.13956, section 3.2). Keras'
`associative_scan` differentiates through the tree of ⊕ applications.

Shape letters: B batch, T timesteps, H heads, D value dimension.
"""

from keras import ops

from keras_aaren.ops.recurrence import aaren_combine, combine_unless, readout, token_leaves


def scan_associative(scores, values, state, mask, starts=None):
    """Every prefix of the sequence by an associative scan, each seeded with `state`.

    scores: (B, T, H); values: (B, T, H, D); state: `(m, u, w)` in the scan dtype; mask: (B, T)
    bool or None; starts: (B, T) bool or None, True where a segment starts from nothing seen
    (`state` seeds the first segment only). Returns the outputs `(B, T, H, D)` and the final
    state.
    """
    leaves = token_leaves(scores, values, mask)
    if starts is None:
        prefix = ops.associative_scan(aaren_combine, leaves, axis=1)
    else:
        # Each leaf also says whether a segment starts at it: B after A is B alone if B starts
        # afresh, and the flag is an OR. The operator stays associative.
        flags = ops.cast(ops.broadcast_to(starts[..., None], ops.shape(scores)), scores.dtype)
        *prefix, _ = ops.associative_scan(combine_segments, (*leaves, flags), axis=1)
    # keras.ops.associative_scan on TensorFlow loses even the rank; give the leaves' shape back.
    prefix = tuple(ops.reshape(p, ops.shape(leaf)) for p, leaf in zip(prefix, leaves))
    start = tuple(x[:, None] for x in state)
    if starts is None:
        total = aaren_combine(start, prefix)
    else:
        later = (ops.cumsum(ops.cast(starts, "int32"), axis=1) > 0)[..., None]  # (B, T, 1)
        total = combine_unless(later, start, prefix)
    final = tuple(x[:, -1] for x in total)
    return readout(total), final


def combine_segments(a, b):
    """⊕ on leaves `(m, u, w, started)`: `b` alone where a segment starts in it."""
    *state_a, started_a = a
    *state_b, started_b = b
    state = combine_unless(started_b > 0, state_a, state_b)
    return (*state, ops.maximum(started_a, started_b))
