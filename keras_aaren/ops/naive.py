"""The naive reference: Aaren as plain masked softmax attention, O(T²) memory.

It forms the whole (query position × key position) score matrix, masks it, and takes a softmax,
exactly as one writes causal attention by hand. It shares no code with the scans and
is the oracle the tests compare every method against.

Shape letters: B batch, T (and K, I) timesteps, H heads, D value dimension.
"""

import numpy as np
from keras import backend, ops

from keras_aaren.ops.backend import full_precision_matmuls


def aaren_attention_naive(scores, values, initial_state=None, mask=None, segment_ids=None):
    """Causal softmax attention of one query per head, written plainly.

    $$o_k = \\sum_{i \\le k,\\ \\text{mask}_i} \\operatorname{softmax}_i(s)\\, v_i$$

    An `initial_state` $(m_0, u_0, w_0)$ with $u_0 > 0$ enters as one more key in front of the
    sequence, with score $m_0 + \\log u_0$ and value $w_0 / u_0$. A row with no real key outputs 0.
    With `segment_ids`, the attention is block-diagonal: a token whose segment id differs from
    the previous token's starts a segment, and each token attends to the tokens of its own
    segment only; the initial state belongs to the first segment.

    Args:
        scores: tensor `(batch_size, timesteps, num_heads)`.
        values: tensor `(batch_size, timesteps, num_heads, value_dim)`.
        initial_state: optional tuple `(m, u, w)`: `(B, H)`, `(B, H)`, `(B, H, D)`.
        mask: optional boolean tensor `(batch_size, timesteps)`, True for a real token.
        segment_ids: optional integer tensor `(batch_size, timesteps)`.

    Returns:
        A tuple `(outputs, final_state)`: outputs `(B, T, H, D)`; `final_state = (m, u, w)` of
        the last segment, with `m` the largest score seen, `u = Σ exp(s_i - m)`,
        `w = Σ exp(s_i - m) v_i`; a row that saw nothing returns its initial state (zeros when
        none was given, or when its last segment is not its first).

    Examples:
        >>> import numpy as np
        >>> scores = np.array([[[0.0], [np.log(3.0)]]])  # (1, 2, 1): token 2 weighs 3x token 1
        >>> values = np.array([[[[1.0]], [[5.0]]]])  # (1, 2, 1, 1)
        >>> outputs, (m, u, w) = aaren_attention_naive(scores, values)
        >>> np.round(np.asarray(outputs)[0, :, 0, 0], 4).tolist()  # 1, then (1 + 3 * 5) / 4
        [1.0, 4.0]
    """
    scores = ops.convert_to_tensor(scores)
    values = ops.convert_to_tensor(values)
    dtype = backend.standardize_dtype(scores.dtype)
    neg = float(np.finfo(dtype).min)
    b, t, h = scores.shape
    d = values.shape[-1]
    if mask is None:
        mask = np.ones((b, t), dtype=bool)
    mask = ops.cast(ops.convert_to_tensor(mask), "bool")
    if initial_state is None:
        initial_state = (
            np.zeros((b, h), dtype),
            np.zeros((b, h), dtype),
            np.zeros((b, h, d), dtype),
        )
    m0, u0, w0 = (ops.cast(ops.convert_to_tensor(x), dtype) for x in initial_state)

    # The initial state as one extra key at position -1, visible from every query position.
    has_start = u0 > 0  # (B, H)
    safe_u0 = ops.where(has_start, u0, 1.0)
    start_score = ops.where(has_start, m0 + ops.log(safe_u0), neg)
    start_value = w0 / safe_u0[..., None]
    keys = ops.concatenate([start_score[:, None], scores], axis=1)  # (B, 1+T, H)
    vals = ops.concatenate([start_value[:, None], values], axis=1)  # (B, 1+T, H, D)

    positions = np.arange(t + 1)
    # causal[k, i]: query position k (0..T-1) sees key i (0 = the start key, i = token i-1).
    causal = positions[None, :] <= (positions[:t, None] + 1)  # (T, 1+T)
    key_ok = ops.concatenate([has_start[:, None, :], ops.repeat(mask[:, :, None], h, axis=2)], 1)
    visible = ops.logical_and(causal[None, :, :, None], key_ok[:, None, :, :])  # (B, T, 1+T, H)
    # run[k]: how many segments started up to token k; the start key is in run 0.
    run = ops.zeros((b, t), "int32")
    if segment_ids is not None:
        ids = ops.convert_to_tensor(segment_ids)
        starts = ops.concatenate(
            [ops.zeros((b, 1), "bool"), ops.not_equal(ids[:, 1:], ids[:, :-1])], axis=1
        )
        run = ops.cumsum(ops.cast(starts, "int32"), axis=1)
        key_run = ops.concatenate([ops.zeros((b, 1), "int32"), run], axis=1)  # (B, 1+T)
        same = ops.equal(run[:, :, None], key_run[:, None, :])  # (B, T, 1+T)
        visible = ops.logical_and(visible, same[..., None])

    logits = ops.where(visible, keys[:, None, :, :], neg)
    row_max = ops.max(logits, axis=2, keepdims=True)
    weights = ops.where(visible, ops.exp(logits - row_max), 0.0)
    denom = ops.sum(weights, axis=2)  # (B, T, H)
    # An oracle must not round below float32, as a GPU's TF32 matmuls would.
    with full_precision_matmuls():
        numer = ops.einsum("bkih,bihd->bkhd", weights, vals)
    outputs = numer / ops.where(denom > 0, denom, 1.0)[..., None]

    # The final state from the last query row, in the (m, u, w) form with m the true running max.
    last_visible = visible[:, -1]  # (B, 1+T, H)
    start_m = ops.where(has_start, m0, neg)
    raw = ops.concatenate([start_m[:, None], scores], axis=1)
    raw = ops.where(last_visible, raw, neg)
    m = ops.max(raw, axis=1)  # (B, H)
    scale = ops.where(last_visible, ops.exp(raw - m[:, None]), 0.0)
    u_parts = ops.concatenate([u0[:, None], ops.ones_like(scores)], axis=1)
    w_parts = ops.concatenate([w0[:, None], values], axis=1)
    u = ops.sum(scale * u_parts, axis=1)
    w = ops.sum(scale[..., None] * w_parts, axis=1)
    seen = u > 0
    # A row whose last segment saw nothing has its state: empty, unless that is the first.
    first = (run[:, -1] == 0)[:, None]  # (B, 1)
    final = (
        ops.where(seen, m, ops.where(first, m0, 0.0)),
        ops.where(seen, u, ops.where(first, u0, 0.0)),
        ops.where(seen[..., None], w, ops.where(first[..., None], w0, 0.0)),
    )
    return outputs, final
