"""The paper's parallel prefix scan: `keras.ops.associative_scan` with the ⊕ operator.

Every prefix state is the ⊕-reduction of the leaves before it, so a work-efficient parallel scan
computes all of them in O(log T) depth (Feng et al., arXiv 2405.13956, section 3.2). Keras'
`associative_scan` differentiates through the tree of ⊕ applications.

Shape letters: B batch, T timesteps, H heads, D value dimension.
"""

from keras import ops

from keras_aaren.ops.recurrence import aaren_combine, readout, token_leaves
from keras_aaren.ops.segments import after_first_start, combine_segments, combine_unless


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
        # Each leaf also says whether a segment starts at it (`combine_segments`).
        flags = ops.cast(ops.broadcast_to(starts[..., None], ops.shape(scores)), scores.dtype)
        *prefix, _ = ops.associative_scan(combine_segments, (*leaves, flags), axis=1)
    # keras.ops.associative_scan on TensorFlow loses even the rank; give the leaves' shape back.
    prefix = tuple(ops.reshape(p, ops.shape(leaf)) for p, leaf in zip(prefix, leaves))
    start = tuple(x[:, None] for x in state)
    if starts is None:
        total = aaren_combine(start, prefix)
    else:
        total = combine_unless(after_first_start(starts)[..., None], start, prefix)
    final = tuple(x[:, -1] for x in total)
    return readout(total), final
