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
from keras_aaren.ops.recurrence import aaren_combine, identity_state, lowest, readout, token_leaves
from keras_aaren.ops.segments import (
    after_first_start,
    combine_unless,
    in_last_segment,
    segment_index,
)

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
        total, outputs = chunked_forward(scores, values, (m0, u0, w0), mask, chunk_size, resets)
        final = tuple(x[:, :, -1] for x in total)

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


def dense_prefix(m, u, w, resets=None):
    """Inclusive prefix states of leaves along the last token axis, as one masked (L × L) product.

    Row k keeps its own running max over leaves i <= k, so every exponent is <= 0 and the row's
    largest term is exactly 1: no overflow, and no prefix underflows to 0/0. With `resets`
    (True where a leaf starts afresh), row k takes the leaves from the last reset up to k.
    m, u: (..., L); w: (..., L, D); resets: bool, broadcastable to m, or None. Returns the shapes
    of m, u, w.
    """
    neg = lowest(m.dtype)
    length = ops.shape(m)[-1]
    idx = ops.arange(length)
    causal = idx[:, None] >= idx[None, :]  # (L, L), row k and column i
    if resets is not None:
        # Leaf i reaches row k when no reset lies in (i, k]: the same count of resets up to both.
        run = segment_index(resets)
        causal = ops.logical_and(causal, ops.equal(run[..., :, None], run[..., None, :]))
    logits = ops.where(causal, m[..., None, :], neg)  # (..., L, L)
    m_prefix = ops.stop_gradient(ops.max(logits, axis=-1))  # (..., L)
    # A leaf (m_i, u_i, w_i) adds u_i e^(m_i - M_k) to u and w_i e^(m_i - M_k) to w: w_i already
    # carries its own weights.
    scale = ops.where(causal, ops.exp(logits - m_prefix[..., None]), 0.0)  # (..., L, L)
    u_prefix = ops.sum(scale * u[..., None, :], axis=-1)
    with full_precision_matmuls():
        w_prefix = matmul(scale, w)
    return m_prefix, u_prefix, w_prefix


def blocked_prefix(m, u, w, chunk_size, levels=DYNAMIC_LEVELS, resets=None):
    """Inclusive prefix states along the token axis in chunks: a dense product inside each chunk,
    then a prefix over the chunk summaries (recursively), then one ⊕.

    A static length recurses until the summaries fit in one chunk; an unknown one recurses
    `levels` times, then takes the remaining summaries' prefix as one dense product. With
    `resets` (True where a leaf starts afresh), a chunk's summary also says whether a reset lies
    in it, which stops the carry from the chunks before.
    m, u: (B, H, T); w: (B, H, T, D); resets: (B, 1 or H, T) bool or None. Returns the shapes of
    m, u, w.
    """
    length = m.shape[-1]
    if (length is not None and length <= chunk_size) or (length is None and levels == 0):
        return dense_prefix(m, u, w, resets)
    b, h, t = ops.shape(m)
    d = w.shape[-1]
    pad = (-t) % chunk_size
    if not isinstance(pad, int) or pad:
        neg = lowest(m.dtype)
        m = ops.pad(m, ((0, 0), (0, 0), (0, pad)), constant_values=neg)
        u = ops.pad(u, ((0, 0), (0, 0), (0, pad)))
        w = ops.pad(w, ((0, 0), (0, 0), (0, pad), (0, 0)))
        if resets is not None:
            resets = ops.pad(resets, ((0, 0), (0, 0), (0, pad)), constant_values=False)
    n = (t + pad) // chunk_size
    if length is not None:
        n = (length + (-length) % chunk_size) // chunk_size
    if resets is not None:
        resets = ops.reshape(resets, (b, ops.shape(resets)[1], n, chunk_size))
    local = dense_prefix(
        ops.reshape(m, (b, h, n, chunk_size)),
        ops.reshape(u, (b, h, n, chunk_size)),
        ops.reshape(w, (b, h, n, chunk_size, d)),
        resets,
    )  # (B, H, N, C), (B, H, N, C), (B, H, N, C, D)
    # Each chunk starts from the state of all chunks before it: shift the chunk summaries right
    # by one, with the identity in front, and take their inclusive prefix.
    summary = tuple(x[:, :, :-1, -1] for x in local)
    first = identity_state(b, h, d, m.dtype)
    carry_leaves = tuple(
        ops.concatenate([ops.expand_dims(f, 2), s], axis=2) for f, s in zip(first, summary)
    )
    carry_resets = None
    if resets is not None:
        # The summary of chunk j - 1 is carry leaf j; a reset inside it drops what came before.
        inside = ops.any(resets, axis=-1)  # (B, 1 or H, N)
        carry_resets = ops.concatenate([ops.zeros_like(inside[..., :1]), inside[..., :-1]], -1)
    carry_m, carry_u, carry_w = blocked_prefix(*carry_leaves, chunk_size, levels - 1, carry_resets)
    carry = (carry_m[..., None], carry_u[..., None], carry_w[..., None, :])
    if resets is None:
        total = aaren_combine(carry, local)
    else:
        # A row after a reset in its own chunk takes nothing from the chunks before.
        total = combine_unless(after_first_start(resets), carry, local)
    m_tot, u_tot = (ops.reshape(x, (b, h, n * chunk_size))[:, :, :t] for x in total[:2])
    w_tot = ops.reshape(total[2], (b, h, n * chunk_size, d))[:, :, :t]
    return m_tot, u_tot, w_tot


def seeded(start, prefix, resets):
    """`start ⊕ prefix` for the rows of the first segment, `prefix` for the rows after a reset.

    start: `(m, u, w)` of shapes (B, H), (B, H), (B, H, D); prefix: head-major prefix states;
    resets: (B, 1, T) bool or None.
    """
    m0, u0, w0 = start
    start = (m0[..., None], u0[..., None], w0[:, :, None])
    if resets is None:
        return aaren_combine(start, prefix)
    return combine_unless(after_first_start(resets), start, prefix)


def chunked_forward(scores, values, start, mask, chunk_size, resets=None):
    """Every prefix's state `total`, head-major (`(B, H, T)`, `(B, H, T)`, `(B, H, T, D)`), and
    the outputs `(B, T, H, D)`. resets: (B, T) bool or None, True where a segment starts."""
    leaves = token_leaves(scores, values, mask)
    if resets is not None:
        resets = resets[:, None, :]  # (B, 1, T): the same segments for every head
    prefix = blocked_prefix(*(head_major(x) for x in leaves), chunk_size, resets=resets)
    total = seeded(start, prefix, resets)
    return total, head_major(readout(total))


def chunked_backward(
    scores, values, start, mask, chunk_size, total, outputs, cotangents, resets=None
):
    """The gradient of the scan in closed form, as one more chunked scan, run in reverse.

    With $L_k$ the log-sum-exp of the scores up to token k, $p_{ki} = e^{s_i - L_k}$ and
    $g_k = \\partial \\ell / \\partial o_k$ for the loss $\\ell$, the outputs contribute

    $$\\frac{\\partial \\ell}{\\partial v_i} = \\sum_{k \\ge i} p_{ki}\\, g_k$$

    $$\\frac{\\partial \\ell}{\\partial s_i} = \\sum_{k \\ge i} p_{ki} (v_i - o_k) \\cdot g_k$$

    suffix sums of $e^{-L_k} [g_k, o_k \\cdot g_k]$ scaled by $e^{s_i}$: the forward scan over
    the reversed sequence, with leaf scores $-m_k$ and values $[g_k, o_k \\cdot g_k] / u_k$
    ($L_k = m_k + \\log u_k$, kept apart so that no large $m_k$ loses digits to a sum). The
    running max $m_k$ never decreases, so the reverse scan's max at token i is $-m_i$ and every
    factor $e^{s_i - m_i}$ is at most 1. The initial state is one more token in front, with mass
    $u_0 e^{m_0}$ and weighted sum $w_0 e^{m_0}$; the final state adds $e^{s_i - m_T}$ terms,
    with $m_T$ held constant as in the forward pass. With segments (`resets`, (B, T) bool), the
    sums run over the token's own segment: the reverse scan starts afresh after each segment's
    last token, the initial state reaches the first segment's outputs only, and the final state
    holds the last segment's tokens only.
    """
    m0, u0, w0 = start
    m_k, u_k, _ = total  # (B, H, T)
    g_out, _, g_u, g_w = cotangents
    g_out = head_major(g_out)  # (B, H, T, D)
    scores = head_major(scores)  # (B, H, T)
    values = head_major(values)  # (B, H, T, D)
    neg = lowest(scores.dtype)
    seen = u_k > 0
    m_final = m_k[:, :, -1]  # (B, H)
    carried = ops.sum(head_major(outputs) * g_out, axis=-1)  # (B, H, T)
    per_mass = ops.where(seen, 1.0 / ops.where(seen, u_k, 1.0), 0.0)[..., None]
    leaves = (
        ops.where(seen, -m_k, neg),
        ops.cast(seen, m_k.dtype),
        ops.concatenate([g_out, carried[..., None]], axis=-1) * per_mass,
    )
    reverse = tuple(ops.flip(x, axis=2) for x in leaves)
    reverse_resets = None
    in_last = in_first = None
    if resets is not None:
        # Run backwards, a segment starts at the forward segment's last token: where the next
        # token starts one.
        ends = ops.concatenate([resets[:, 1:], ops.zeros_like(resets[:, :1])], axis=1)
        reverse_resets = ops.flip(ends, axis=1)[:, None, :]  # (B, 1, T)
        in_last = in_last_segment(resets)[:, None, :]  # (B, 1, T)
        in_first = ops.logical_not(ops.any(resets, axis=1, keepdims=True))  # (B, 1): one segment
    suffix_m, _, suffix_w = (
        ops.flip(x, axis=2) for x in blocked_prefix(*reverse, chunk_size, resets=reverse_resets)
    )  # (B, H, T), _, (B, H, T, D + 1)
    dim = values.shape[-1]

    real = ops.ones_like(scores, dtype="bool") if mask is None else mask[:, None, :] & seen
    to_outputs = ops.exp(ops.where(real, scores + suffix_m, neg))  # (B, H, T)
    final_real = real if in_last is None else ops.logical_and(real, in_last)
    to_final = ops.exp(ops.where(final_real, scores - m_final[..., None], neg))
    d_values = to_outputs[..., None] * suffix_w[..., :dim] + to_final[..., None] * g_w[:, :, None]
    d_scores = (
        ops.sum(values * d_values, axis=-1)
        - to_outputs * suffix_w[..., dim]
        + to_final * g_u[..., None]
    )
    d_values = ops.where(real[..., None], d_values, 0.0)
    d_scores = ops.where(real, d_scores, 0.0)

    has_start = u0 > 0
    start_to_outputs = ops.exp(ops.where(has_start, m0 + suffix_m[:, :, 0], neg))  # (B, H)
    final_start = has_start if in_first is None else ops.logical_and(has_start, in_first)
    start_to_final = ops.exp(ops.where(final_start, m0 - m_final, neg))
    d_w0 = start_to_outputs[..., None] * suffix_w[:, :, 0, :dim] + start_to_final[..., None] * g_w
    d_u0 = start_to_final * g_u - start_to_outputs * suffix_w[:, :, 0, dim]
    d_m0 = ops.sum(w0 * d_w0, axis=-1) + u0 * d_u0
    return head_major(d_scores), head_major(d_values), d_m0, d_u0, d_w0
