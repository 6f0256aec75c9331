"""Aaren as a recurrence: the state, the ⊕ operator, one step and the readout.

Aaren (Feng et al., "Attention as an RNN", arXiv 2405.13956) attends with one learned query per
head, so its output at token k is a softmax-weighted mean of the values seen so far:

$$o_k = \\frac{\\sum_{i \\le k} e^{s_i} v_i}{\\sum_{i \\le k} e^{s_i}}$$

The state after a prefix is the triple $(m, u, w)$: the running maximum $m$ of the scores, the
sum $u = \\sum e^{s_i - m}$ and the weighted sum $w = \\sum e^{s_i - m} v_i$, and $o = w / u$.
A state with $u = 0$ has seen nothing; that includes the all-zero state that
`keras.layers.RNN.reset_state()` writes. Every function here treats it as the identity, and
reads it out as the output 0.

Shape letters: B batch, T timesteps, H heads, D value dimension.
"""

import numpy as np
from keras import backend, ops

from keras_aaren.ops.backend import matmul


def scan_dtype(dtype):
    """The dtype the scan runs in: float64 stays float64, everything else runs in float32."""
    return "float64" if backend.standardize_dtype(dtype) == "float64" else "float32"


def lowest(dtype):
    """The identity's running max: a finite "minus infinity", because -inf - (-inf) is NaN.

    The dtype's minimum, but no lower than float32's: Keras' PyTorch `where` converts a Python
    float through float32, which would turn float64's minimum into -inf. Any score is far above
    it, and `exp` of a difference with it is 0 in every dtype the scan runs in.
    """
    dtype = backend.standardize_dtype(dtype)
    return float(max(np.finfo(dtype).min, np.finfo("float32").min))


def identity_state(batch_size, num_heads, value_dim, dtype="float32"):
    """The state of "nothing seen yet": `(m, u, w)` = (dtype minimum, 0, 0).

    Args:
        batch_size: int, the batch size B.
        num_heads: int, the number of heads H.
        value_dim: int, the value dimension D.
        dtype: the float dtype of the state.

    Returns:
        A tuple `(m, u, w)` of shapes `(B, H)`, `(B, H)`, `(B, H, D)`.

    Examples:
        >>> m, u, w = identity_state(batch_size=2, num_heads=4, value_dim=8)
        >>> tuple(m.shape), tuple(u.shape), tuple(w.shape)
        ((2, 4), (2, 4), (2, 4, 8))
    """
    m = ops.full((batch_size, num_heads), lowest(dtype), dtype=dtype)
    u = ops.zeros((batch_size, num_heads), dtype=dtype)
    w = ops.zeros((batch_size, num_heads, value_dim), dtype=dtype)
    return m, u, w


def larger(a, b):
    """The elementwise max of `a` and `b`, in the dtype of `a`.

    `keras.ops.maximum`, except for float64 on PyTorch, where Keras' type promotion computes it
    in float32 (`keras_aaren.compat`, item 8) and a selection keeps the dtype.
    """
    if backend.backend() == "torch" and backend.standardize_dtype(a.dtype) == "float64":
        return ops.where(a >= b, a, b)
    return ops.maximum(a, b)


def empty_as_identity(m, u):
    """`m` where the state has seen a token, the identity's running max where it has not.

    An empty state (u == 0) may carry any m (the all-zero state carries 0); replacing it keeps it
    from winning the running max and scaling a real token's weight to zero.
    """
    return ops.where(u > 0, m, lowest(m.dtype))


def combine_scales(m_a, u_a, m_b, u_b, restart=None):
    """The running max of `A ⊕ B` and the factors that scale A's and B's sums to it.

    `(m, scale_a, scale_b)`: the sums of `A ⊕ B` are `u_a * scale_a + u_b * scale_b` and
    `w_a * scale_a + w_b * scale_b`. Empty states (`u == 0`) act as the identity. Where
    `restart` holds (B starts afresh), `scale_a` is 0 and the max is B's; A's exponent is then
    capped at 0 so that a larger max of A cannot overflow before it is zeroed. The cap is
    subtracted as a constant: a `minimum` would halve the gradient at a tie (JAX splits it),
    where A holds the max. The running max carries no gradient.
    """
    m_a = empty_as_identity(m_a, u_a)
    m_b = empty_as_identity(m_b, u_b)
    if restart is None:
        m = ops.stop_gradient(larger(m_a, m_b))
        scale_a = ops.exp(m_a - m)
    else:
        m = ops.stop_gradient(ops.where(restart, m_b, larger(m_a, m_b)))
        exponent = m_a - m
        keep = ops.cast(ops.logical_not(restart), m.dtype)
        scale_a = ops.exp(exponent - ops.stop_gradient(larger(exponent, 0.0))) * keep
    return m, scale_a, ops.exp(m_b - m)


def aaren_combine(state_a, state_b):
    """The associative operator ⊕ of the paper: the state of prefix A followed by segment B.

    $$(m_A, u_A, w_A) \\oplus (m_B, u_B, w_B) = (m, u, w), \\qquad m = \\max(m_A, m_B)$$

    $$u = u_A e^{m_A - m} + u_B e^{m_B - m}, \\qquad w = w_A e^{m_A - m} + w_B e^{m_B - m}$$

    Empty states (`u == 0`, whatever their `m`) act as the identity. The running max carries no
    gradient: the readout `w / u` does not depend on it.

    Args:
        state_a: tuple `(m, u, w)` with shapes `(..., H)`, `(..., H)`, `(..., H, D)`.
        state_b: tuple of the same structure, broadcastable against `state_a`.

    Returns:
        The combined state `(m, u, w)`.

    Examples:
        >>> import numpy as np
        >>> a = (np.array([[0.0]]), np.array([[1.0]]), np.array([[[1.0]]]))  # one token, s=0, v=1
        >>> b = (np.array([[2.0]]), np.array([[1.0]]), np.array([[[3.0]]]))  # one token, s=2, v=3
        >>> m, u, w = aaren_combine(a, b)
        >>> float(np.asarray(m)[0, 0]), round(float(np.asarray(u)[0, 0]), 4)  # 2, 1 + e^-2
        (2.0, 1.1353)
    """
    # NumPy inputs become tensors first: PyTorch cannot multiply an ndarray by a tensor.
    m_a, u_a, w_a = (ops.convert_to_tensor(x) for x in state_a)
    m_b, u_b, w_b = (ops.convert_to_tensor(x) for x in state_b)
    m, scale_a, scale_b = combine_scales(m_a, u_a, m_b, u_b)
    u = u_a * scale_a + u_b * scale_b
    w = w_a * scale_a[..., None] + w_b * scale_b[..., None]
    return m, u, w


def readout(state):
    """The output `w / u` of a state, and 0 for a state that has seen nothing.

    Args:
        state: tuple `(m, u, w)` with shapes `(..., H)`, `(..., H)`, `(..., H, D)`.

    Returns:
        Tensor of shape `(..., H, D)`.

    Examples:
        >>> import numpy as np
        >>> state = (np.zeros((1, 2)), np.array([[4.0, 0.0]]), np.array([[[2.0], [7.0]]]))
        >>> np.asarray(readout(state)).ravel().tolist()  # w / u, and 0 where nothing was seen
        [0.5, 0.0]
    """
    _, u, w = state
    seen = (u > 0)[..., None]
    # Divide by 1 where u == 0, so that neither the value nor its gradient is NaN there.
    safe_u = ops.where(u > 0, u, ops.ones_like(u))[..., None]
    return ops.where(seen, w / safe_u, ops.zeros_like(w))


def aaren_step(state, score, value):
    """One token of the Aaren recurrence, the RNN view of the paper.

    $$m' = \\max(m, s), \\qquad u' = u\\,e^{m - m'} + e^{s - m'}$$

    $$w' = w\\,e^{m - m'} + v\\,e^{s - m'}, \\qquad o = w' / u'$$

    Args:
        state: tuple `(m, u, w)` of shapes `(B, H)`, `(B, H)`, `(B, H, D)`; `u == 0` means
            nothing seen (the all-zero state included).
        score: tensor of shape `(B, H)`, the token's score $s = q \\cdot k / \\sqrt{d_k}$, finite.
        value: tensor of shape `(B, H, D)`, the token's value $v$.

    Returns:
        A tuple `(output, new_state)`: `output` of shape `(B, H, D)` in the dtype of `value`,
        `new_state` in the scan dtype (float32, or float64 for float64 inputs).

    Examples:
        >>> import numpy as np
        >>> state = identity_state(batch_size=1, num_heads=1, value_dim=1)
        >>> for score, value in [(0.0, 1.0), (np.log(3.0), 5.0)]:
        ...     output, state = aaren_step(state, np.array([[score]]), np.array([[[value]]]))
        >>> round(float(np.asarray(output)[0, 0, 0]), 4)  # (1 + 3 * 5) / (1 + 3)
        4.0
    """
    # expand_dims rather than `[..., None]`, which TensorFlow traces as a strided slice.
    return _step(state, score, value, lambda t: ops.expand_dims(t, -1), empty_as_identity)


#: The ways `aaren_step_flat` spreads a per-head tensor over the value columns of its head.
SPREADS = ("broadcast", "product")


def aaren_step_flat(state, score, value, spread="broadcast"):
    """`aaren_step` with `w` and the value flat, `(B, H * D)` (head-major), as a cell stores `w`
    and as the output projection takes the attended values.

    This is the recurrence of a one-token step, written for the graphs that deployment runtimes
    run, where each op costs a fixed overhead that dwarfs its arithmetic at one token. How the
    per-head scales reach the value columns (`spread`) is the one choice between forms:

    * `"broadcast"`: the values viewed as `(B, H, D)` and the scales as `(B, H, 1)`.
    * `"product"`: the scales multiplied by a constant 0/1 matrix `(H, H * D)`: one op where the
      views take two or three, exact in floating point (each column sums one scale and zeros).
      An empty state's running max becomes -inf rather than the dtype's minimum, by adding
      `log(sign(u))` (three small ops where a select is one slow op in ONNX Runtime, or six
      as TensorFlow-to-ONNX conversion writes a select of finite floats); the token's score is
      finite, so the new max is finite and no -inf meets another. For graphs whose products stay
      in floating point and that are never calibrated: a quantizer would round the scales with
      the product's inputs, and the state with them, and could not calibrate a range with -inf.

    Args:
        state: tuple `(m, u, w)` of shapes `(B, H)`, `(B, H)`, `(B, H * D)`.
        score: tensor of shape `(B, H)`, finite.
        value: tensor of shape `(B, H * D)`.
        spread: `"broadcast"` or `"product"`.

    Returns:
        A tuple `(output, new_state)` as `aaren_step`'s, with `output` and `w` of shape
        `(B, H * D)`.

    Examples:
        >>> import numpy as np
        >>> state = (np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 4)))  # nothing seen yet
        >>> value = np.array([[1.0, 2.0, 3.0, 4.0]])
        >>> for spread in SPREADS:
        ...     output, _ = aaren_step_flat(state, np.zeros((1, 2)), value, spread=spread)
        ...     print(np.asarray(output).tolist())  # one token seen: its value
        [[1.0, 2.0, 3.0, 4.0]]
        [[1.0, 2.0, 3.0, 4.0]]
    """
    if spread not in SPREADS:
        raise ValueError(f"`spread` must be one of {SPREADS}. Received: spread={spread!r}")
    value = ops.convert_to_tensor(value)
    heads = score.shape[-1]
    value_dim = value.shape[-1] // heads
    if spread == "broadcast":
        m, u, w = state
        state = (m, u, ops.reshape(w, (-1, heads, value_dim)))
        value = ops.reshape(value, (-1, heads, value_dim))
        output, (m, u, w) = aaren_step(state, score, value)
        flat = (-1, heads * value_dim)
        return ops.reshape(output, flat), (m, u, ops.reshape(w, flat))
    columns = np.repeat(np.eye(heads), value_dim, axis=1).astype(scan_dtype(value.dtype))
    return _step(state, score, value, lambda t: matmul(t, columns), _empty_as_minus_infinity)


def _empty_as_minus_infinity(m, u):
    """`empty_as_identity` with -inf for the empty state's max: log(sign(u)) is 0 where the
    state has seen a token and -inf where it has not."""
    return m + ops.stop_gradient(ops.log(ops.sign(u)))


def _step(state, score, value, per_value, empty_as_lowest):
    """The step of `aaren_step`: `per_value(t)` spreads a `(B, H)` tensor over the values,
    `empty_as_lowest(m, u)` gives an empty state's max a value below any score."""
    out_dtype = ops.convert_to_tensor(value).dtype
    dtype = scan_dtype(out_dtype)
    m, u, w = (ops.cast(t, dtype) for t in state)
    score = ops.cast(score, dtype)
    value = ops.cast(value, dtype)
    m = empty_as_lowest(m, u)
    m_new = ops.stop_gradient(larger(m, score))
    scale_old = ops.exp(m - m_new)
    scale_new = ops.exp(score - m_new)
    u_new = u * scale_old + scale_new
    w_new = w * per_value(scale_old) + value * per_value(scale_new)
    output = w_new / per_value(u_new)
    return ops.cast(output, out_dtype), (m_new, u_new, w_new)


def token_leaves(scores, values, mask):
    """The scan's leaves: `(s, 1, v)` for a real token, the identity `(min, 0, 0)` for a masked one.

    scores: (B, T, H); values: (B, T, H, D); mask: (B, T) bool or None.
    """
    if mask is None:
        return scores, ops.ones_like(scores), values
    keep = mask[:, :, None]
    m = ops.where(keep, scores, lowest(scores.dtype))
    u = ops.cast(keep, scores.dtype) * ops.ones_like(scores)
    w = ops.where(keep[..., None], values, ops.zeros_like(values))
    return m, u, w
