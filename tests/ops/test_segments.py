"""aaren_scan with `segment_ids`: several sequences packed in one row stay apart, for every
method, against the naive oracle on a block-diagonal causal mask (outputs, final states,
gradients)."""

import functools

import keras
import numpy as np
import pytest
from helpers import assert_close, gradients
from keras import ops

from keras_aaren.ops import aaren_attention_naive, aaren_scan, readout

METHODS = ["sequential", "associative", "chunked", "auto"]

# Segment layouts against the default chunk of 8 tokens: ends inside a chunk, on chunk borders,
# segments of one token, one segment (no reset), and ids that come back (only changes count).
SEGMENTS = ["inside", "borders", "singles", "one", "returning"]


def make_segments(kind, batch, steps, rng):
    if kind == "inside":
        lengths = rng.integers(1, 12, size=(batch, steps))
        ids = np.stack([np.repeat(np.arange(steps), row)[:steps] for row in lengths])
    elif kind == "borders":
        ids = np.broadcast_to(np.arange(steps) // 8, (batch, steps))
    elif kind == "singles":
        ids = np.broadcast_to(np.arange(steps), (batch, steps))
    elif kind == "one":
        ids = np.zeros((batch, steps))
    else:
        ids = np.broadcast_to((np.arange(steps) // 5) % 2, (batch, steps))
    return np.array(ids, dtype="int32")


def make_scores(kind, batch, steps, heads, rng):
    scores = 3.0 * rng.normal(size=(batch, steps, heads))
    if kind == "ramps":
        ramp = 10.0 * np.arange(steps)
        scores[:, :, 0] = ramp
        scores[:, :, -1] = -ramp
    return scores


def make_mask(kind, batch, steps, rng):
    if kind == "none":
        return None
    if kind == "right":
        mask = np.ones((batch, steps), dtype=bool)
        mask[:, steps - max(1, steps // 4) :] = False
        return mask
    mask = rng.random((batch, steps)) > 0.3
    mask[0] = False
    return mask


def make_state(batch, heads, dim, rng):
    m = 5.0 * rng.normal(size=(batch, heads))
    u = rng.uniform(0.5, 3.0, size=(batch, heads))
    w = rng.normal(size=(batch, heads, dim)) * u[..., None]
    return m, u, w


def f32(*arrays):
    return tuple(None if a is None else np.asarray(a, "float32") for a in arrays)


CASES = [(3, 1, 2, 3), (3, 37, 2, 3), (2, 64, 3, 4), (2, 100, 2, 5)]


def case_id(case):
    return "B{}-T{}-H{}-D{}".format(*case)


@pytest.mark.parametrize("shape", CASES, ids=[case_id(c) for c in CASES])
@pytest.mark.parametrize("mask_kind", ["none", "holes", "right"])
@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("method", METHODS)
def test_segments_match_block_diagonal_naive(method, segments, mask_kind, shape):
    batch, steps, heads, dim = shape
    rng = np.random.default_rng(steps)
    scores = make_scores("ramps", batch, steps, heads, rng)
    values = rng.normal(size=(batch, steps, heads, dim))
    ids = make_segments(segments, batch, steps, rng)
    mask = make_mask(mask_kind, batch, steps, rng)
    state = make_state(batch, heads, dim, rng)
    expected, expected_final = aaren_attention_naive(scores, values, state, mask, ids)
    outputs, final = aaren_scan(
        *f32(scores, values), f32(*state), mask, method=method, segment_ids=ids
    )
    assert_close(outputs, expected, what="outputs")
    for name, got, want in zip("muw", final, expected_final):
        assert_close(got, want, what=f"final {name}")


def test_each_segment_equals_its_sequence_alone():
    # The oracle is itself checked: a packed row gives each sequence what the scan gives it
    # alone, from nothing seen (the first from the initial state).
    rng = np.random.default_rng(3)
    lengths = [5, 1, 9, 8, 3]
    steps, heads, dim = sum(lengths), 2, 3
    scores = make_scores("ramps", 1, steps, heads, rng)
    values = rng.normal(size=(1, steps, heads, dim))
    ids = np.repeat(np.arange(len(lengths)), lengths)[None]
    state = make_state(1, heads, dim, rng)
    packed, _ = aaren_attention_naive(scores, values, state, None, ids)
    packed = np.asarray(packed)
    start = 0
    for index, length in enumerate(lengths):
        part = slice(start, start + length)
        alone, _ = aaren_attention_naive(
            scores[:, part], values[:, part], state if index == 0 else None
        )
        np.testing.assert_allclose(packed[:, part], np.asarray(alone), atol=1e-12)
        start += length


@functools.cache
def _loss(method):
    # One function per method, so that JAX compiles the gradient once per shape.
    def loss(scores, values, m0, u0, w0, mask, ids, g_out, g_final):
        g_out, g_final = ops.convert_to_tensor(g_out), ops.convert_to_tensor(g_final)
        if method == "naive":
            outputs, final = aaren_attention_naive(scores, values, (m0, u0, w0), mask, ids)
        else:
            outputs, final = aaren_scan(
                scores, values, (m0, u0, w0), mask, method=method, segment_ids=ids
            )
        m, u, _ = final
        lse = ops.where(u > 0, m + ops.log(ops.where(u > 0, u, 1.0)), 0.0)
        return ops.sum(outputs * g_out) + ops.sum(readout(final) * g_final) + ops.sum(lse)

    return loss


@pytest.mark.parametrize("shape", CASES[1:], ids=[case_id(c) for c in CASES[1:]])
@pytest.mark.parametrize("segments", ["inside", "borders", "singles", "returning"])
@pytest.mark.parametrize("method", ["sequential", "associative", "chunked"])
def test_segment_gradients_match_naive(method, segments, shape):
    batch, steps, heads, dim = shape
    rng = np.random.default_rng(steps + 1)
    scores = make_scores("ramps", batch, steps, heads, rng)
    values = rng.normal(size=(batch, steps, heads, dim))
    ids = make_segments(segments, batch, steps, rng)
    mask = make_mask("holes", batch, steps, rng)
    state = make_state(batch, heads, dim, rng)
    weights = (rng.normal(size=(batch, steps, heads, dim)), rng.normal(size=(batch, heads, dim)))

    inputs64 = [scores, values, *state]
    expected = gradients(_loss("naive"), inputs64, (mask, ids, *weights))
    got = gradients(_loss(method), list(f32(*inputs64)), (mask, ids, *f32(*weights)))
    for name, g, e in zip(["scores", "values", "m0", "u0", "w0"], got, expected):
        assert np.all(np.isfinite(g)), name
        assert_close(g, e, atol=1e-4, rtol=1e-4, what=f"d/d{name}")


@pytest.mark.parametrize("method", ["associative", "chunked"])
def test_segments_in_float16(method):
    # Half-precision inputs: the scan runs in float32 and returns the inputs' dtype. (float64:
    # tests/test_float64.py.)
    rng = np.random.default_rng(9)
    scores = make_scores("normal", 2, 45, 2, rng)
    values = rng.normal(size=(2, 45, 2, 3))
    ids = make_segments("inside", 2, 45, rng)
    half = [np.asarray(x, "float16") for x in (scores, values)]
    outputs, (m, _, _) = aaren_scan(*half, method=method, segment_ids=ids)
    assert keras.backend.standardize_dtype(outputs.dtype) == "float16"
    assert keras.backend.standardize_dtype(m.dtype) == "float32"
    expected, _ = aaren_attention_naive(*[x.astype("float64") for x in half], None, None, ids)
    assert_close(ops.cast(outputs, "float32"), expected, atol=5e-3, rtol=5e-3)


def test_all_masked_last_segment_ends_empty():
    # After a reset, a segment that saw nothing holds the empty state, not the initial one.
    rng = np.random.default_rng(2)
    scores, values = rng.normal(size=(1, 6, 1)), rng.normal(size=(1, 6, 1, 2))
    state = make_state(1, 1, 2, rng)
    mask = np.array([[True, True, True, False, False, False]])
    ids = np.array([[0, 0, 0, 1, 1, 1]])
    for method in METHODS:
        outputs, final = aaren_scan(
            *f32(scores, values), f32(*state), mask, method=method, segment_ids=ids
        )
        np.testing.assert_array_equal(np.asarray(ops.convert_to_numpy(outputs))[0, 3:], 0.0)
        for x in final:
            np.testing.assert_array_equal(ops.convert_to_numpy(x), 0.0)


@pytest.mark.parametrize(
    "segment_ids, match",
    [
        (np.zeros((2, 4), "float32"), r"`segment_ids` must be integers.*float32"),
        (np.zeros((2, 5), "int32"), r"`segment_ids` must have shape.*\(2, 4\).*\(2, 5\)"),
        (np.zeros((2,), "int32"), r"`segment_ids` must have shape"),
    ],
    ids=["float", "length", "rank"],
)
def test_bad_segment_ids_raise(segment_ids, match):
    scores, values = np.zeros((2, 4, 1), "float32"), np.zeros((2, 4, 1, 2), "float32")
    with pytest.raises(ValueError, match=match):
        aaren_scan(scores, values, segment_ids=segment_ids)
