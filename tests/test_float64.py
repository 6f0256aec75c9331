"""float64 in, float64 computed, on every backend that holds float64: the op, the layer and the
cell against float64 references written plainly in NumPy, at 1e-9 (float32 rounding would miss
it by orders of magnitude)."""

import keras
import numpy as np
import pytest
from helpers import gradients, numpy_output, numpy_projections, to_numpy

from keras_aaren import Aaren
from keras_aaren.ops import aaren_attention_naive, aaren_scan

TOLERANCE = 1e-9

pytestmark = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="JAX holds float64 only with jax_enable_x64, a process-wide switch; it computes "
    "float64 inputs in float32 otherwise",
)

METHODS = [
    "sequential",
    pytest.param(
        "associative",
        marks=pytest.mark.xfail(
            keras.backend.backend() == "torch",
            strict=True,
            reason="keras.ops.associative_scan on PyTorch interleaves its partial results in "
            "torch's default dtype, float32 (see keras_aaren.compat)",
        ),
    ),
    "chunked",
]


def numpy_attention(scores, values, ids):
    """Causal softmax attention of one query per head over each segment, and the final state of
    the last segment, in float64 NumPy: the O(T²) oracle, written plainly."""
    batch, steps, heads = scores.shape
    outputs = np.zeros(values.shape)
    final = (np.zeros((batch, heads)), np.zeros((batch, heads)), np.zeros(values[:, 0].shape))
    for b in range(batch):
        for k in range(steps):
            first = k
            while first > 0 and ids[b, first - 1] == ids[b, k]:
                first -= 1
            s = scores[b, first : k + 1]  # (K, H)
            m = s.max(axis=0)
            weights = np.exp(s - m)
            u = weights.sum(axis=0)
            w = np.einsum("kh,khd->hd", weights, values[b, first : k + 1])
            outputs[b, k] = w / u[:, None]
            if k == steps - 1:
                final[0][b], final[1][b], final[2][b] = m, u, w
    return outputs, final


def case(seed=0, batch=2, steps=23, heads=3, dim=4):
    rng = np.random.default_rng(seed)
    scores = 4.0 * rng.normal(size=(batch, steps, heads)) + np.linspace(0, 30, steps)[:, None]
    values = rng.normal(size=(batch, steps, heads, dim))
    ids = np.repeat(np.arange(4), 6)[None, :steps].repeat(batch, axis=0).astype("int32")
    ids[1] = 0  # one row of one segment
    return scores, values, ids


@pytest.mark.parametrize("method", METHODS)
def test_scan_computes_float64_in_float64(method):
    scores, values, ids = case()
    outputs, final = aaren_scan(scores, values, method=method, segment_ids=ids)
    expected, expected_final = numpy_attention(scores, values, ids)
    assert keras.backend.standardize_dtype(outputs.dtype) == "float64"
    np.testing.assert_allclose(to_numpy(outputs), expected, atol=TOLERANCE, rtol=TOLERANCE)
    # The running max may differ where the reference sees an equal score; u and w scale by it.
    for got, want in zip(final[1:], expected_final[1:]):
        ratio = np.exp(expected_final[0] - to_numpy(final[0]))
        want = want * (ratio if want.ndim == 2 else ratio[..., None])
        np.testing.assert_allclose(to_numpy(got), want, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("method", METHODS)
def test_scan_gradients_in_float64(method):
    # The reference gradient is that of the naive attention, a different computation that
    # keeps float64 through the backend's autodiff (einsum, softmax written plainly).
    scores, values, ids = case(seed=1, steps=17)
    weights = np.random.default_rng(2).normal(size=values.shape)

    def loss(fn):
        def run(s, v, w, i):
            outputs, (_, u, final_w) = fn(s, v, i)
            # The read-out final state: u and w alone scale with the running max.
            weighted = outputs * keras.ops.convert_to_tensor(w)
            return keras.ops.sum(weighted) + keras.ops.sum(final_w / u[..., None]) / 7.0

        return run

    def scan(s, v, i):
        return aaren_scan(s, v, method=method, segment_ids=i)

    def naive(s, v, i):
        return aaren_attention_naive(s, v, segment_ids=i)

    got = gradients(loss(scan), [scores, values], (weights, ids))
    want = gradients(loss(naive), [scores, values], (weights, ids))
    for g, w, name in zip(got, want, ("scores", "values")):
        assert g.dtype == np.float64, name
        np.testing.assert_allclose(g, w, atol=TOLERANCE, rtol=TOLERANCE, err_msg=name)


def float64_layer(x):
    layer = Aaren(3, 4, return_sequences=True, return_state=True, dtype="float64")
    layer(x)
    # Weights of a larger scale spread the scores over tens of units.
    layer.set_weights([3.0 * w for w in layer.get_weights()])
    return layer


def test_layer_and_cell_compute_float64_in_float64():
    x = np.random.default_rng(3).normal(size=(2, 19, 5))
    layer = float64_layer(x)
    scores, values = numpy_projections(layer.cell, x)
    ids = np.zeros(scores.shape[:2], "int32")
    attended, _ = numpy_attention(scores, values, ids)
    expected = numpy_output(layer.cell, attended)

    outputs, last, _ = layer(x)
    stepped, stepped_last, _ = keras.layers.RNN(
        layer.cell, return_sequences=True, return_state=True, dtype="float64"
    )(x)
    for name, got in (("layer", outputs), ("cell", stepped)):
        assert keras.backend.standardize_dtype(got.dtype) == "float64", name
        np.testing.assert_allclose(
            to_numpy(got), expected, atol=TOLERANCE, rtol=TOLERANCE, err_msg=name
        )
    for name, got in (("layer", last), ("cell", stepped_last)):
        np.testing.assert_allclose(
            to_numpy(got), expected[:, -1], atol=TOLERANCE, rtol=TOLERANCE, err_msg=name
        )
