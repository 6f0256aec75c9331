"""The chunked scan: Aaren's prefix reduction as matrix products, with a closed-form gradient.

Inside each chunk of C tokens, every prefix is one masked (C × C) product whose rows keep their
own running max; a prefix over the chunk summaries (itself chunked, recursively) carries the
state from chunk to chunk, and one ⊕ joins the two. There is no loop, so XLA
compiles it, and the work is O(T·C) per head. The gradient is not the scan differentiated: it is
the closed form of `chunked_backward`, one more chunked scan run in reverse.

Shape letters: B batch, T timesteps, H heads, D value dimension, N chunks, C chunk length,
L length of the axis a helper reduces over.
"""

from keras import ops

from keras_aaren.ops.backend import full_precision_matmuls, matmul, with_gradient
from keras_aaren.ops.recurrence import (
    combine_scales,
    empty_as_identity,
    identity_state,
    lowest,
    token_leaves,
)
from keras_aaren.ops.segments import after_first_start, before_last_start, segment_index

# The intra-chunk work grows as T·C, while below 8 the prefix over chunk summaries dominates;
# docs/benchmarks.md gives the figures for each size (`python -m benchmarks.scan`).
DEFAULT_CHUNK_SIZE = 8

# A length unknown when the caller traces (a TensorFlow graph that serves any length) cannot
# end the recursion where the length runs out, so it chunks this many levels and takes the
# prefix of the T / C**levels summaries left as one dense product: with C = 8, a million tokens
# leave 245 summaries, whose (245 × 245) product is small beside the chunks' own work.
DYNAMIC_LEVELS = 4


def scan_chunked(scores, values, state, mask, chunk_size=DEFAULT_CHUNK_SIZE, starts=None):
    """Every prefix of the sequence by the chunked scan, each seeded with `state`.

    scores: (B, T, H); values: (B, T, H, D); state: `(m, u, w)` in the scan dtype; mask: (B, T)
    bool or None; starts: (B, T) bool or None, True where a segment starts (from nothing seen;
    `state` seeds the first segment only). Returns the outputs `(B, T, H, D)` and the final
    state; the gradient is `chunked_backward`'s closed form.
    """

    def forward(scores, values, m0, u0, w0, real, fresh):
        mask = None if real is None else real > 0
        resets = None if fresh is None else fresh > 0
        total, outputs, final = chunked_forward(
            scores, values, (m0, u0, w0), mask, chunk_size, resets
        )

        def backward(cotangents):
            grads = chunked_backward(
                scores, values, (m0, u0, w0), mask, chunk_size, total, outputs, cotangents, resets
            )
            return (*grads, *(ops.zeros_like(x) for x in (real, fresh) if x is not None))

        return (outputs, *final), backward

    # The mask and the segment starts go in as arguments, not closures: when a caller's JAX
    # program differentiates the scan, a closed-over tensor is a tracer of that program, which
    # the gradient cannot use. As floats, since gradients flow to every input.
    flags = [None if x is None else ops.cast(x, scores.dtype) for x in (mask, starts)]
    given = [x for x in flags if x is not None]

    def run(scores, values, m0, u0, w0, *given):
        rest = iter(given)
        real, fresh = (None if x is None else next(rest) for x in flags)
        return forward(scores, values, m0, u0, w0, real, fresh)

    outputs, *final = with_gradient(run)(scores, values, *state, *given)
    return outputs, tuple(final)


def head_major(x):
    """`(B, T, H…)` to `(B, H, T…)` and back: the chunked scan works along the last token axis.

    With heads in front of the tokens, the product inside each chunk is a plain batched matmul
    and needs no transposes of its (C × C) weights, which a token-major layout would need on
    every chunk.
    """
    return ops.swapaxes(x, 1, 2)


def chunk_weights(m, u, resets=None, reverse=False):
    """Inside each chunk, every row's running max, sum and the weights of the leaves it sums.

    Row k keeps its own running max over leaves i <= k, so every exponent is <= 0 and the row's
    largest term is exactly 1: no overflow, and no prefix underflows to 0/0. With `resets`
    (True where a leaf starts afresh), row k takes the leaves from the last reset up to k.
    A leaf (m_i, u_i, w_i) adds u_i e^(m_i - M_k) to u and w_i e^(m_i - M_k) to w: w_i already
    carries its own weights. With `reverse`, the same read from the end: row k takes the leaves
    i >= k, up to the first reset at or after k.

    Args:
        m, u: (..., L), the leaves along the chunk's last axis.
        resets: bool, broadcastable to m, or None.
        reverse: sum the leaves after each row instead of those before it.

    Returns:
        `(m_prefix, u_prefix, scale)`: shapes (..., L), (..., L) and (..., L, L), row k and
        column i; `scale @ w` is the rows' weighted sums.
    """
    neg = lowest(m.dtype)
    length = ops.shape(m)[-1]
    idx = ops.arange(length)
    causal = idx[:, None] >= idx[None, :]  # (L, L), row k and column i
    if reverse:
        causal = ops.transpose(causal)
    if resets is not None:
        # Leaf i reaches row k when no reset lies in (i, k]: the same count of resets up to both.
        # Read from the end, when none lies in [k, i): the same count of resets before both.
        run = segment_index(resets)
        if reverse:
            run = run - ops.cast(resets, run.dtype)
        causal = ops.logical_and(causal, ops.equal(run[..., :, None], run[..., None, :]))
    logits = ops.where(causal, m[..., None, :], neg)  # (..., L, L)
    m_prefix = ops.stop_gradient(ops.max(logits, axis=-1))  # (..., L)
    # The exponent of every pair, selected after `exp`: an `exp` of the dtype's minimum, as the
    # pairs outside the mask would give, takes a slow path in some vectorized libraries, and
    # those pairs are dropped whatever their value.
    scale = ops.where(causal, ops.exp(m[..., None, :] - m_prefix[..., None]), 0.0)  # (..., L, L)
    u_prefix = ops.sum(scale * u[..., None, :], axis=-1)
    return m_prefix, u_prefix, scale


def blocked_prefix(
    m,
    u,
    w,
    chunk_size,
    levels=DYNAMIC_LEVELS,
    resets=None,
    start=None,
    normalize=False,
    reverse=False,
):
    """Inclusive prefix states along the token axis in chunks: weighted sums inside each chunk,
    a prefix over the chunk summaries (recursively), and one ⊕ of the two per token.

    A static length recurses until the summaries fit in one chunk; an unknown one recurses
    `levels` times, then takes the remaining summaries' prefix in one chunk. With `resets` (True
    where a leaf starts afresh), a chunk's summary also says whether a reset lies in it, which
    stops the carry from the chunks before. `start`, the state before the first leaf, enters as
    the first chunk's carry, so it costs no ⊕ of its own. With `normalize`, the weighted sums
    come out divided by their masses, `w / u` (0 where nothing was seen), in the same pass as
    the ⊕. With `reverse`, every state sums its leaf and those after it (suffixes, read from the
    end of the axis, as a backward pass needs them, with no reversed copy of the leaves): `start`
    is then the state after the last leaf, a reset marks a leaf that starts afresh read from the
    end, and `final` is the state of the first leaf.

    Args:
        m, u: (B, H, T); w: (B, H, T, D), the leaves.
        chunk_size: the chunk length C.
        levels: the depth of chunking for an unknown length.
        resets: (B, 1 or H, T) bool or None.
        start: optional `(m, u, w)` of shapes (B, H), (B, H), (B, H, D).
        normalize: return `w / u` instead of `w`.
        reverse: suffixes instead of prefixes.

    Returns:
        `(m, u, w, final)`: `(m, u, w)` of every prefix, with the shapes of the leaves (`w / u`
        with `normalize`), and `final`, the state after the last leaf, `(m, u, w)` of shapes
        (B, H), (B, H), (B, H, D).
    """
    length = m.shape[-1]
    b, h, t = ops.shape(m)
    d = w.shape[-1]
    if start is not None:
        # As a leaf, an empty start (u == 0, whatever its m and w) must weigh nothing.
        m0, u0, w0 = start
        start = (empty_as_identity(m0, u0), u0, ops.where((u0 > 0)[..., None], w0, 0.0))
    single = (length is not None and length <= chunk_size) or (length is None and levels == 0)
    if single:
        # One chunk: the whole axis.
        chunk, n, pad = t, 1, 0
    else:
        chunk = chunk_size
        pad = (-t) % chunk
        n = (t + pad) // chunk
        if length is not None:
            n = (length + (-length) % chunk) // chunk
        if not isinstance(pad, int) or pad:
            m = ops.pad(m, ((0, 0), (0, 0), (0, pad)), constant_values=lowest(m.dtype))
            u = ops.pad(u, ((0, 0), (0, 0), (0, pad)))
            w = ops.pad(w, ((0, 0), (0, 0), (0, pad), (0, 0)))
            if resets is not None:
                resets = ops.pad(resets, ((0, 0), (0, 0), (0, pad)), constant_values=False)
    m = ops.reshape(m, (b, h, n, chunk))
    u = ops.reshape(u, (b, h, n, chunk))
    w = ops.reshape(w, (b, h, n, chunk, d))
    if resets is not None:
        resets = ops.reshape(resets, (b, ops.shape(resets)[1], n, chunk))
    m_local, u_local, scale = chunk_weights(m, u, resets, reverse)  # (B, H, N, C), (B, H, N, C, C)
    with full_precision_matmuls():
        w_local = matmul(scale, w)  # (B, H, N, C, D)
    if single:
        carry = start
    else:
        # Each chunk starts from the state of all chunks before it: the chunk summaries shifted
        # right by one, `start` (or the identity) in front, and their inclusive prefix. In
        # reverse, from the state of all chunks after it: the summaries (each chunk's first
        # row) shifted left, `start` behind.
        local = (m_local, u_local, w_local)
        first = identity_state(b, h, d, m.dtype) if start is None else start
        if reverse:
            summary = tuple(x[:, :, 1:, 0] for x in local)
            carry_leaves = tuple(
                ops.concatenate([s, ops.expand_dims(f, 2)], axis=2) for f, s in zip(first, summary)
            )
        else:
            summary = tuple(x[:, :, :-1, -1] for x in local)
            carry_leaves = tuple(
                ops.concatenate([ops.expand_dims(f, 2), s], axis=2) for f, s in zip(first, summary)
            )
        carry_resets = None
        if resets is not None:
            # The summary of chunk j - 1 (j + 1 in reverse) is carry leaf j; a reset inside it
            # drops what came before (after) it.
            inside = ops.any(resets, axis=-1)  # (B, 1 or H, N)
            none = ops.zeros_like(inside[..., :1])
            if reverse:
                carry_resets = ops.concatenate([inside[..., 1:], none], -1)
            else:
                carry_resets = ops.concatenate([none, inside[..., :-1]], -1)
        carry = blocked_prefix(
            *carry_leaves, chunk_size, levels - 1, carry_resets, reverse=reverse
        )[:3]
    # The state after the last leaf (the first, in reverse): the last row of the last chunk,
    # whose padding, if any, adds nothing.
    edge = 0 if reverse else -1
    if carry is None:
        m_total, u_total, w_total = m_local, u_local, w_local
        final_w = w_local[:, :, edge, edge]
    else:
        m_carry, u_carry, w_carry = carry  # (B, H, N), (B, H, N), (B, H, N, D)
        if single:  # `start` itself, (B, H) and (B, H, D): the carry of the one chunk
            m_carry, u_carry, w_carry = m_carry[..., None], u_carry[..., None], w_carry[:, :, None]
        # A row after a reset in its own chunk (before one, in reverse) takes nothing from the
        # chunks before (after) it.
        restart = None
        if resets is not None:
            restart = before_last_start(resets) if reverse else after_first_start(resets)
        m_total, scale_carry, scale_local = combine_scales(
            m_carry[..., None], u_carry[..., None], m_local, u_local, restart
        )
        u_total = u_carry[..., None] * scale_carry + u_local * scale_local
        edge_local, edge_carry = scale_local[:, :, edge, edge], scale_carry[:, :, edge, edge]
        final_w = w_local[:, :, edge, edge] * edge_local[..., None]
        final_w = final_w + w_carry[:, :, edge] * edge_carry[..., None]
        if normalize:
            # The division folds into the scales of the ⊕, so the prefix states' `w` is never
            # formed.
            inverse = _inverse(u_total)
            scale_carry, scale_local = scale_carry * inverse, scale_local * inverse
        w_total = w_local * scale_local[..., None] + w_carry[..., None, :] * scale_carry[..., None]
    if normalize and carry is None:
        w_total = w_total * _inverse(u_total)[..., None]
    final = (m_total[:, :, edge, edge], u_total[:, :, edge, edge], final_w)
    m_total, u_total = (ops.reshape(x, (b, h, n * chunk))[:, :, :t] for x in (m_total, u_total))
    w_total = ops.reshape(w_total, (b, h, n * chunk, d))[:, :, :t]
    return m_total, u_total, w_total, final


def _inverse(u):
    """1 / u, and 0 where u == 0 (nothing seen), with no NaN in the value or its gradient."""
    seen = u > 0
    return ops.where(seen, 1.0 / ops.where(seen, u, 1.0), 0.0)


def chunked_forward(scores, values, start, mask, chunk_size, resets=None):
    """Every prefix's running max and mass, head-major (`(B, H, T)` each), the outputs
    `(B, T, H, D)` and the final state. resets: (B, T) bool or None, True where a segment
    starts."""
    leaves = token_leaves(scores, values, mask)
    if resets is not None:
        resets = resets[:, None, :]  # (B, 1, T): the same segments for every head
    m_total, u_total, outputs, final = blocked_prefix(
        *(head_major(x) for x in leaves), chunk_size, resets=resets, start=start, normalize=True
    )
    return (m_total, u_total), head_major(outputs), final


def chunked_backward(
    scores, values, start, mask, chunk_size, total, outputs, cotangents, resets=None
):
    """The gradient of the scan in closed form, as one more chunked scan, run in reverse.

    With $L_k$ the log-sum-exp of the scores up to token k, $p_{ki} = e^{s_i - L_k}$ and
    $g_k = \\partial \\ell / \\partial o_k$ for the loss $\\ell$, the outputs contribute

    $$\\frac{\\partial \\ell}{\\partial v_i} = \\sum_{k \\ge i} p_{ki}\\, g_k$$

    $$\\frac{\\partial \\ell}{\\partial s_i} = \\sum_{k \\ge i} p_{ki} (v_i - o_k) \\cdot g_k$$

    suffix sums of $e^{-L_k} [g_k, o_k \\cdot g_k]$ scaled by $e^{s_i}$: the chunked scan of
    suffixes (`blocked_prefix(..., reverse=True)`), with leaf scores $-m_k$ and values
    $[g_k, o_k \\cdot g_k] / u_k$ ($L_k = m_k + \\log u_k$, kept apart so that no large $m_k$
    loses digits to a sum). The running max $m_k$ never decreases, so the suffix's max at token
    i is $-m_i$ and every factor $e^{s_i - m_i}$ is at most 1. The final state's cotangent
    $(g_u, g_w)$ adds $e^{s_i - m_T} [g_w, -g_u]$ (with $m_T$ held constant, as in the forward
    pass): one more leaf after the last token, the suffix scan's start. The initial state is one
    more token in front, with mass $u_0 e^{m_0}$ and weighted sum $w_0 e^{m_0}$. With segments
    (`resets`, (B, T) bool), the sums run over the token's own segment: the suffix scan starts
    afresh at each segment's last token, so the initial state reaches the first segment's
    outputs only, and the final state's cotangent the last segment's tokens only.
    """
    m0, u0, w0 = start
    m_k, u_k = total  # (B, H, T)
    g_out, _, g_u, g_w = cotangents  # g_out: (B, T, H, D)
    neg = lowest(scores.dtype)
    seen = u_k > 0
    carried = head_major(ops.sum(outputs * g_out, axis=-1))  # (B, H, T)
    per_mass = ops.where(seen, 1.0 / ops.where(seen, u_k, 1.0), 0.0)[..., None]
    leaves = (
        ops.where(seen, -m_k, neg),
        ops.cast(seen, m_k.dtype),
        ops.concatenate([head_major(g_out), carried[..., None]], axis=-1) * per_mass,
    )
    # An empty final state (u == 0) has no cotangent to carry: as the scan's start, it is the
    # identity.
    after_last = (
        -m_k[:, :, -1],
        ops.cast(seen[:, :, -1], m_k.dtype),
        ops.concatenate([g_w, -g_u[..., None]], axis=-1),
    )
    ends = None
    if resets is not None:
        # Read from the end, a segment starts at its last token: where the next token starts one.
        ends = ops.concatenate([resets[:, 1:], ops.zeros_like(resets[:, :1])], axis=1)[:, None]
    suffix_m, _, suffix_w, _ = blocked_prefix(
        *leaves, chunk_size, resets=ends, start=after_last, reverse=True
    )
    # Token-major again, (B, T, H) and (B, T, H, D + 1), before the products with the scores
    # and values: one transpose of the suffixes, where transposing every product costs XLA
    # more than the suffix scan itself.
    suffix_m, suffix_w = head_major(suffix_m), head_major(suffix_w)
    dim = values.shape[-1]

    if mask is None:
        # Every token is real: nothing to select.
        to_outputs = ops.exp(scores + suffix_m)  # (B, T, H)
    else:
        real = mask[:, :, None] & head_major(seen)
        to_outputs = ops.exp(ops.where(real, scores + suffix_m, neg))
    d_values = to_outputs[..., None] * suffix_w[..., :dim]
    d_scores = ops.sum(values * d_values, axis=-1) - to_outputs * suffix_w[..., dim]
    if mask is not None:
        d_values = ops.where(real[..., None], d_values, 0.0)
        d_scores = ops.where(real, d_scores, 0.0)

    # The initial state reaches what token 0's suffix reaches, the final state included.
    has_start = u0 > 0
    start_to_outputs = ops.exp(ops.where(has_start, m0 + suffix_m[:, 0], neg))  # (B, H)
    d_w0 = start_to_outputs[..., None] * suffix_w[:, 0, :, :dim]
    d_u0 = -start_to_outputs * suffix_w[:, 0, :, dim]
    d_m0 = ops.sum(w0 * d_w0, axis=-1) + u0 * d_u0
    return d_scores, d_values, d_m0, d_u0, d_w0
