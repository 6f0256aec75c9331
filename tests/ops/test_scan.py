"""aaren_scan, aaren_step and aaren_combine against the naive softmax-attention oracle."""

import functools

import keras
import numpy as np
import pytest
from helpers import assert_close, gradients, naive_attention, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from keras_aaren.ops import (
    aaren_attention_naive,
    aaren_combine,
    aaren_scan,
    aaren_step,
    identity_state,
    readout,
)
from keras_aaren.ops.recurrence import SPREADS, aaren_step_flat

ALL_METHODS = ["sequential", "associative", "chunked"]
SCORES = ["normal", "ramp_up", "ramp_down", "mixed"]
MASKS = ["none", "left", "right", "middle", "holes", "empty_row"]


def make_scores(kind, batch, steps, heads, rng):
    ramp = 10.0 * np.arange(steps)[None, :, None]
    if kind == "normal":
        return 3.0 * rng.normal(size=(batch, steps, heads))
    if kind == "ramp_up":
        return np.broadcast_to(ramp, (batch, steps, heads)).copy()
    if kind == "ramp_down":
        return np.broadcast_to(-ramp, (batch, steps, heads)).copy()
    scores = 3.0 * rng.normal(size=(batch, steps, heads))
    scores[:, :, 0] = ramp[..., 0]
    scores[:, :, -1] = -ramp[..., 0]
    return scores


def make_mask(kind, batch, steps, rng):
    mask = np.ones((batch, steps), dtype=bool)
    cut = max(1, steps // 3)
    if kind == "none":
        return None
    if kind == "left":
        mask[:, :cut] = False
    elif kind == "right":
        mask[:, steps - cut :] = False
    elif kind == "middle":
        mask[:, cut : 2 * cut] = False
    elif kind == "holes":
        mask = rng.random((batch, steps)) > 0.4
    elif kind == "empty_row":
        mask[0] = False
    return mask


def make_state(batch, heads, dim, rng, empty_heads=True):
    m = 5.0 * rng.normal(size=(batch, heads))
    u = rng.uniform(0.5, 3.0, size=(batch, heads))
    w = rng.normal(size=(batch, heads, dim)) * u[..., None]
    if empty_heads:
        # An empty state may carry any m and w; u == 0 alone says "nothing seen".
        u[0, 0] = 0.0
    return m, u, w


def f32(*arrays):
    return tuple(None if a is None else np.asarray(a, "float32") for a in arrays)


def case_id(batch, steps, heads, dim):
    return f"B{batch}-T{steps}-H{heads}-D{dim}"


SHAPES = [(2, 1, 2, 3), (2, 63, 3, 4), (3, 100, 2, 5)]


# "mixed" has a +10·i ramp in one head and a -10·i ramp in another; the pure ramps run over
# 1000 tokens for every method in test_scan_matches_naive_long.
@pytest.mark.parametrize("shape", SHAPES, ids=[case_id(*s) for s in SHAPES])
@pytest.mark.parametrize("scores_kind", ["normal", "mixed"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_scan_matches_naive(method, mask_kind, scores_kind, shape):
    batch, steps, heads, dim = shape
    rng = np.random.default_rng(steps * 7 + heads)
    scores = make_scores(scores_kind, batch, steps, heads, rng)
    values = rng.normal(size=(batch, steps, heads, dim))
    mask = make_mask(mask_kind, batch, steps, rng)
    state = make_state(batch, heads, dim, rng)

    expected, expected_final = naive_attention(scores, values, state, mask)
    outputs, final = aaren_scan(*f32(scores, values), f32(*state), mask, method=method)

    assert_close(outputs, expected, what="outputs")
    for name, got, want in zip("muw", final, expected_final):
        assert_close(got, want, what=f"final {name}")


@pytest.mark.parametrize(
    "method, scores_kind",
    [("sequential", "mixed"), *[(m, s) for m in ALL_METHODS[1:] for s in SCORES[1:]]],
)
def test_scan_matches_naive_long(method, scores_kind):
    batch, steps, heads, dim = 2, 1000, 2, 3
    rng = np.random.default_rng(1)
    scores = make_scores(scores_kind, batch, steps, heads, rng)
    values = rng.normal(size=(batch, steps, heads, dim))
    mask = make_mask("holes", batch, steps, rng)

    expected, expected_final = naive_attention(scores, values, None, mask)
    outputs, final = aaren_scan(*f32(scores, values), None, mask, method=method)

    assert_close(outputs, expected, what="outputs")
    for name, got, want in zip("muw", final, expected_final):
        assert_close(got, want, what=f"final {name}")


@functools.cache
def _loss(method):
    # One function per method, so that the gradient helper compiles it once per shape on JAX;
    # the mask and the output weights come in as arguments.
    def loss(scores, values, m0, u0, w0, mask, g_out, g_final):
        # Tensors, not ndarrays: PyTorch cannot multiply a tensor that requires grad by an
        # ndarray.
        g_out, g_final = ops.convert_to_tensor(g_out), ops.convert_to_tensor(g_final)
        if method == "naive":
            outputs, final = aaren_attention_naive(scores, values, (m0, u0, w0), mask)
        else:
            outputs, final = aaren_scan(scores, values, (m0, u0, w0), mask, method=method)
        m, u, _ = final
        # Only functions of the state that do not depend on how it is normalized: the output
        # w / u and the log-sum-exp m + log u of the scores seen.
        lse = ops.where(u > 0, m + ops.log(ops.where(u > 0, u, 1.0)), 0.0)
        return ops.sum(outputs * g_out) + ops.sum(readout(final) * g_final) + ops.sum(lse)

    return loss


@pytest.mark.parametrize("shape", SHAPES, ids=[case_id(*s) for s in SHAPES])
@pytest.mark.parametrize("scores_kind", ["normal", "mixed"])
@pytest.mark.parametrize("mask_kind", ["none", "left", "holes", "empty_row"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_scan_gradients_match_naive(method, mask_kind, scores_kind, shape):
    batch, steps, heads, dim = shape
    rng = np.random.default_rng(steps + 3)
    scores = make_scores(scores_kind, batch, steps, heads, rng)
    values = rng.normal(size=(batch, steps, heads, dim))
    mask = make_mask(mask_kind, batch, steps, rng)
    if mask is None:
        mask = np.ones((batch, steps), dtype=bool)
    state = make_state(batch, heads, dim, rng)
    weights = (rng.normal(size=(batch, steps, heads, dim)), rng.normal(size=(batch, heads, dim)))

    inputs64 = [scores, values, *state]
    expected = gradients(_loss("naive"), inputs64, (mask, *weights))
    got = gradients(_loss(method), list(f32(*inputs64)), (mask, *f32(*weights)))

    for name, g, e in zip(["scores", "values", "m0", "u0", "w0"], got, expected):
        assert np.all(np.isfinite(g)), name
        assert_close(g, e, atol=1e-4, rtol=1e-4, what=f"d/d{name}")


@pytest.mark.parametrize("scores_kind", SCORES[1:])
@pytest.mark.parametrize("method", ["associative", "chunked"])
def test_scan_gradients_match_naive_long(method, scores_kind):
    # The chunked scan's closed-form backward runs a scan in reverse: ramps of ±10·i over a
    # thousand tokens check that it keeps a per-token max there too.
    batch, steps, heads, dim = 2, 1000, 2, 3
    rng = np.random.default_rng(4)
    scores = make_scores(scores_kind, batch, steps, heads, rng)
    values = rng.normal(size=(batch, steps, heads, dim))
    mask = make_mask("holes", batch, steps, rng)
    state = make_state(batch, heads, dim, rng)
    weights = (rng.normal(size=(batch, steps, heads, dim)), rng.normal(size=(batch, heads, dim)))

    expected = gradients(_loss("naive"), [scores, values, *state], (mask, *weights))
    got = gradients(_loss(method), list(f32(scores, values, *state)), (mask, *f32(*weights)))

    for name, g, e in zip(["scores", "values", "m0", "u0", "w0"], got, expected):
        assert np.all(np.isfinite(g)), name
        assert_close(g, e, atol=1e-4, rtol=1e-4, what=f"d/d{name}")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_zero_state_means_nothing_seen(method):
    # keras.layers.RNN.reset_state() writes zeros: that state must act as the identity, even for
    # very negative scores that a "running max" of 0 would underflow.
    rng = np.random.default_rng(0)
    # Rounded to float32 first: near -5000 float32 is only good to ~5e-4, for both sides.
    scores = (-5000.0 + rng.normal(size=(2, 9, 2))).astype("float32").astype("float64")
    values = rng.normal(size=(2, 9, 2, 3))
    zeros = (np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2, 3)))
    expected, _ = aaren_attention_naive(scores, values)
    outputs, _ = aaren_scan(*f32(scores, values), f32(*zeros), method=method)
    assert_close(outputs, expected)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_all_masked_gives_zero_and_keeps_state(method):
    rng = np.random.default_rng(0)
    scores, values = f32(rng.normal(size=(2, 5, 2)), rng.normal(size=(2, 5, 2, 3)))
    mask = np.zeros((2, 5), dtype=bool)
    outputs, final = aaren_scan(scores, values, mask=mask, method=method)
    np.testing.assert_array_equal(to_numpy(outputs), 0.0)
    for x in final:
        np.testing.assert_array_equal(to_numpy(x), 0.0)
    state = f32(*make_state(2, 2, 3, rng, empty_heads=False))
    _, final = aaren_scan(scores, values, state, mask=mask, method=method)
    for got, want in zip(final, state):
        np.testing.assert_array_equal(to_numpy(got), want)


def test_step_by_step_equals_scan():
    rng = np.random.default_rng(0)
    scores, values = f32(make_scores("mixed", 2, 20, 3, rng), rng.normal(size=(2, 20, 3, 4)))
    expected, expected_final = aaren_scan(scores, values, method="chunked")
    state = tuple(np.zeros(s, "float32") for s in [(2, 3), (2, 3), (2, 3, 4)])
    for t in range(20):
        output, state = aaren_step(state, scores[:, t], values[:, t])
        assert_close(output, to_numpy(expected)[:, t])
    for got, want in zip(state, expected_final):
        assert_close(got, want)


def _flat(state):
    m, u, w = state
    return m, u, np.reshape(w, (w.shape[0], -1))


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("start", ["zeros", "empty_heads", "identity"])
def test_flat_step_equals_step(start, spread):
    # Both forms of the one-token step, from a state that has seen tokens, from zeros, whose
    # running max of 0 would underflow the weight of scores near -5000, from an empty head that
    # carries some m, and from the scans' identity (the lowest m).
    rng = np.random.default_rng(3)
    scores = f32(make_scores("mixed", 2, 12, 3, rng))[0]
    scores[:, :4] -= 5000.0
    values = f32(rng.normal(size=(2, 12, 3, 4)))[0]
    if start == "zeros":
        state = tuple(np.zeros(s, "float32") for s in [(2, 3), (2, 3), (2, 3, 4)])
    elif start == "empty_heads":
        state = f32(*make_state(2, 3, 4, rng))
    else:
        state = tuple(to_numpy(t) for t in identity_state(2, 3, 4))
    flat = _flat(state)
    for t in range(12):
        output, state = aaren_step(state, scores[:, t], values[:, t])
        flat_output, flat = aaren_step_flat(
            flat, scores[:, t], _flat((0, 0, values[:, t]))[2], spread
        )
        assert np.all(np.isfinite(to_numpy(flat_output)))
        assert_close(flat_output, np.reshape(to_numpy(output), (2, -1)))
        for got, want in zip(flat, _flat(tuple(to_numpy(x) for x in state))):
            assert_close(got, want)


@pytest.mark.parametrize("spread", SPREADS)
def test_flat_step_gradients_equal_step(spread):
    # The running max carries no gradient in either form, and the empty head's -inf (the
    # product form) puts no NaN in any gradient.
    rng = np.random.default_rng(4)
    state = f32(*make_state(2, 3, 4, rng))
    score, value = f32(3.0 * rng.normal(size=(2, 3)), rng.normal(size=(2, 3, 4)))
    weights = f32(rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3)))

    def loss(step, score, value, m, u, w):
        output, (_, new_u, new_w) = step((m, u, w), score, value)
        new_w = ops.reshape(new_w, (2, 3, 4))
        output = ops.reshape(output, (2, 3, 4))
        # The weights enter as tensors: PyTorch's product with a NumPy array would convert the
        # tensor that requires grad to NumPy.
        weight_output, weight_u = (ops.convert_to_tensor(x) for x in weights)
        return ops.sum(output * weight_output) + ops.sum(new_u * weight_u) + ops.sum(new_w)

    def flat_step(state, score, value):
        m, u, w = state
        return aaren_step_flat(
            (m, u, ops.reshape(w, (2, 12))), score, ops.reshape(value, (2, 12)), spread
        )

    inputs = [score, value, *state]
    expected = gradients(functools.partial(loss, aaren_step), inputs)
    got = gradients(functools.partial(loss, flat_step), inputs)
    for name, g, e in zip(["score", "value", "m", "u", "w"], got, expected):
        assert np.all(np.isfinite(g)), name
        assert_close(g, e, what=f"d/d{name}")


def test_flat_step_checks_spread():
    with pytest.raises(ValueError, match="`spread` must be one of"):
        aaren_step_flat(identity_state(1, 1, 1), np.zeros((1, 1)), np.zeros((1, 1)), "gather")


def test_combine_identity_and_associativity():
    rng = np.random.default_rng(0)
    states = [f32(*make_state(2, 3, 4, rng, empty_heads=False)) for _ in range(3)]
    a, b, c = states
    left = aaren_combine(aaren_combine(a, b), c)
    right = aaren_combine(a, aaren_combine(b, c))
    for x, y in zip(left, right):
        assert_close(x, y)
    identity = identity_state(2, 3, 4)
    for state in (aaren_combine(identity, a), aaren_combine(a, identity)):
        for x, y in zip(state, a):
            assert_close(x, y)


def test_half_precision_runs_in_float32():
    rng = np.random.default_rng(0)
    scores = (np.arange(300) * 0.5)[None, :, None] * np.ones((2, 1, 2))
    values = rng.normal(size=(2, 300, 2, 3)) * 100.0
    expected, _ = aaren_attention_naive(scores, values)
    outputs, final = aaren_scan(scores.astype("float16"), values.astype("float16"))
    assert keras.backend.standardize_dtype(outputs.dtype) == "float16"
    assert keras.backend.standardize_dtype(final[1].dtype) == "float32"
    assert np.all(np.isfinite(to_numpy(outputs)))
    assert_close(ops.cast(outputs, "float32"), expected, atol=0.1, rtol=2e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_outputs_keep_dtype_and_device(method, dtype):
    # Each backend's associative_scan, and PyTorch's packed custom gradient, must neither change
    # the outputs' dtype nor move them off the inputs' device; the state stays in float32.
    rng = np.random.default_rng(7)
    scores = ops.convert_to_tensor(rng.normal(size=(2, 37, 3)), dtype)
    values = ops.convert_to_tensor(rng.normal(size=(2, 37, 3, 4)), dtype)
    outputs, final = aaren_scan(scores, values, method=method)
    assert keras.backend.standardize_dtype(outputs.dtype) == dtype
    assert [keras.backend.standardize_dtype(x.dtype) for x in final] == ["float32"] * 3
    if keras.backend.backend() == "torch":
        assert {x.device for x in (outputs, *final)} == {values.device}


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    steps=st.integers(1, 150),
    heads=st.integers(1, 3),
    dim=st.integers(1, 4),
    chunk_size=st.integers(2, 40),
    scale=st.sampled_from([0.1, 3.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_naive_property(batch, steps, heads, dim, chunk_size, scale, seed):
    rng = np.random.default_rng(seed)
    scores = scale * rng.normal(size=(batch, steps, heads))
    values = rng.normal(size=(batch, steps, heads, dim))
    mask = rng.random((batch, steps)) > rng.uniform(0, 0.9)
    state = make_state(batch, heads, dim, rng)
    expected, expected_final = naive_attention(scores, values, state, mask)
    outputs, final = aaren_scan(
        *f32(scores, values), f32(*state), mask, method="chunked", chunk_size=chunk_size
    )
    assert_close(outputs, expected)
    for got, want in zip(final, expected_final):
        assert_close(got, want)


def _bad(**changes):
    rng = np.random.default_rng(0)
    args = {
        "scores": rng.normal(size=(2, 5, 3)).astype("float32"),
        "values": rng.normal(size=(2, 5, 3, 4)).astype("float32"),
        "initial_state": None,
        "mask": None,
        "method": "auto",
    }
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"method": "parallel"}, "`method` must be one of"),
        ({"chunk_size": 0}, "`chunk_size` must be an integer >= 2"),
        ({"chunk_size": 1}, "`chunk_size` must be an integer >= 2. Received: chunk_size=1"),
        (
            {"scores": np.zeros((2, 5), "float32")},
            r"\(batch_size, timesteps, num_heads\)\. Received: scores.shape=\(2, 5\)",
        ),
        (
            {"values": np.zeros((2, 5, 3), "float32")},
            r"`values` must have shape \(batch_size, timesteps, num_heads, value_dim\)\.",
        ),
        ({"values": np.zeros((2, 6, 3, 4), "float32")}, "Received: values.shape=\\(2, 6, 3, 4\\)"),
        ({"mask": np.ones((2, 4), bool)}, "Received: mask.shape=\\(2, 4\\)"),
        ({"mask": np.ones((2, 5, 1), bool)}, "`mask` must have shape \\(batch_size, timesteps\\)"),
        ({"initial_state": (np.zeros((2, 3)),) * 2}, "`initial_state` must be a tuple"),
        (
            {"initial_state": (np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3, 5)))},
            "initial_state.w",
        ),
    ],
    ids=[
        "method",
        "chunk_size",
        "chunk_size_one",
        "scores_rank",
        "values_rank",
        "values_steps",
        "mask_shape",
        "mask_rank",
        "state_len",
        "state_w",
    ],
)
def test_bad_input_raises(changes, match):
    with pytest.raises(ValueError, match=match):
        aaren_scan(**_bad(**changes))


def test_auto_is_exact():
    rng = np.random.default_rng(5)
    scores = make_scores("mixed", 2, 130, 3, rng)
    values = rng.normal(size=(2, 130, 3, 4))
    mask = make_mask("holes", 2, 130, rng)
    expected, expected_final = naive_attention(scores, values, None, mask)
    outputs, final = aaren_scan(*f32(scores, values), None, mask, method="auto")
    assert_close(outputs, expected)
    for got, want in zip(final, expected_final):
        assert_close(got, want)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="only TensorFlow traces unknown lengths"
)
@pytest.mark.parametrize("method", ["auto", "chunked"])
def test_unknown_length_traces_once_for_every_length(method):
    # A TensorFlow graph that serves any length (Keras' predict relaxes to one after a few
    # lengths) holds the scan as plain ops: one trace for every length, and a length past
    # DYNAMIC_LEVELS levels of chunks (8**4 = 4096) exercises the dense prefix left on top.
    import tensorflow as tf

    spec = tf.TensorSpec((None, None, 2), "float32"), tf.TensorSpec((None, None, 2, 3), "float32")

    @tf.function(input_signature=[*spec, tf.TensorSpec((None, None), "bool")])
    def scan(scores, values, mask):
        with tf.GradientTape() as tape:
            tape.watch(scores)
            outputs, final = aaren_scan(scores, values, None, mask, method=method)
            loss = tf.reduce_sum(outputs * values)
        return outputs, final, tape.gradient(loss, scores)

    def loss(scores, values, mask):
        return ops.sum(naive_attention(scores, values, None, mask)[0] * values)

    rng = np.random.default_rng(6)
    for steps in (1, 9, 64, 100, 5000):
        scores = make_scores("mixed", 2, steps, 2, rng)
        values = rng.normal(size=(2, steps, 2, 3))
        mask = make_mask("holes", 2, steps, rng)
        expected, expected_final = naive_attention(scores, values, None, mask)
        outputs, final, grad = scan(*f32(scores, values), mask)
        assert_close(outputs, expected, what=f"T={steps} outputs")
        for name, got, want in zip("muw", final, expected_final):
            assert_close(got, want, what=f"T={steps} final {name}")
        if steps <= 100:
            (want,) = gradients(loss, [scores], (values, mask))
            assert_close(grad, want, atol=1e-4, rtol=1e-4, what=f"T={steps} d/dscores")
    assert scan.experimental_get_tracing_count() == 1


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="XLA inside a caller's graph is TensorFlow's"
)
def test_graphs_of_known_shapes_compile_at_most_the_limit_of_programs():
    # Each new signature traced into a caller's graph of known shapes compiles one XLA program
    # of the scan, up to the limit; beyond it the scan runs as plain ops. Both are exact, and
    # a graph of unknown length compiles nothing.
    import tensorflow as tf

    from keras_aaren.ops import program_count, set_program_limit

    def loss(scores, values, mask):
        return ops.sum(naive_attention(scores, values, None, mask)[0] * values)

    @tf.function
    def scan(scores, values, mask):
        with tf.GradientTape() as tape:
            tape.watch(scores)
            outputs, _ = aaren_scan(scores, values, None, mask)
            total = tf.reduce_sum(outputs * values)
        return outputs, tape.gradient(total, scores)

    before = program_count()
    set_program_limit(before + 2)
    try:
        rng = np.random.default_rng(8)
        for steps in (5, 11, 29, 70, 131):
            scores, values = f32(
                make_scores("mixed", 2, steps, 2, rng), rng.normal(size=(2, steps, 2, 3))
            )
            mask = make_mask("holes", 2, steps, rng)
            outputs, grad = scan(scores, values, mask)
            assert_close(outputs, naive_attention(scores, values, None, mask)[0], what=f"T={steps}")
            (want,) = gradients(loss, [scores], (values, mask))
            assert_close(grad, want, atol=1e-4, rtol=1e-4, what=f"T={steps} d/dscores")
            assert program_count() == before + min(2, 1 + [5, 11, 29, 70, 131].index(steps))
        unknown = tf.function(
            lambda s, v: aaren_scan(s, v)[0],
            input_signature=[tf.TensorSpec((2, None, 2)), tf.TensorSpec((2, None, 2, 3))],
        )
        unknown(scores, values)
        assert program_count() == before + 2
    finally:
        set_program_limit(8)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_empty_sequence_names_the_time_axis(method):
    match = "at least one timestep.*timesteps.*scores.shape=\\(2, 0, 3\\)"
    with pytest.raises(ValueError, match=match):
        aaren_scan(np.zeros((2, 0, 3), "float32"), np.zeros((2, 0, 3, 4), "float32"), method=method)


@pytest.mark.parametrize("limit", [0, -1, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_eager_program_limit_must_be_a_positive_integer(limit):
    from keras_aaren.ops import set_program_limit

    with pytest.raises(
        ValueError, match=f"`limit` must be a positive integer. Received: limit={limit!r}"
    ):
        set_program_limit(limit)
