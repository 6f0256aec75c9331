"""keras_aaren.streaming.state: a stream's state read, written, saved and resumed, also in
another process, and a stateful Aaren layer's state over a million tokens against float64."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import assert_close, data, numpy_output, numpy_projections, to_numpy
from streaming_models import BATCH, STEPS, functional_mixed, sequential_blocks

import keras_aaren
from keras_aaren import Aaren, streaming

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(keras_aaren.__file__)))


def test_state_round_trip_and_errors(tmp_path):
    model = sequential_blocks()
    x = data(BATCH, STEPS, 3, seed=2)
    expected = to_numpy(model(x))
    stream = streaming.to_streaming(model, BATCH)
    first = to_numpy(stream(x[:, :10]))
    saved = streaming.get_states(stream)
    assert list(saved) == [layer.name for layer in stream.layers if getattr(layer, "stateful", 0)]
    path = streaming.save_states(stream, tmp_path / "state")
    stream(x[:, 10:15])
    streaming.load_states(stream, path)
    rest = to_numpy(stream(x[:, 10:]))
    assert_close(np.concatenate([first, rest], axis=1), expected)

    other = streaming.to_streaming(functional_mixed(), BATCH)
    with pytest.raises(ValueError, match="exactly this model's stateful layers"):
        streaming.set_states(other, saved)
    wider = streaming.to_streaming(model, BATCH + 1)
    with pytest.raises(ValueError, match=r"must have shapes \[\(3, 8\).*Received: \[\(2, 8\)"):
        streaming.load_states(wider, path)


RESUME = """
import sys
import numpy as np
import keras
from keras_aaren import streaming

model_path, state_path, x_path, out_path = sys.argv[1:]
stream = streaming.to_streaming(keras.models.load_model(model_path), {batch})
streaming.load_states(stream, state_path)
np.save(out_path, keras.ops.convert_to_numpy(stream(np.load(x_path))))
"""


def test_checkpoint_resumes_bit_identical_after_restart(tmp_path):
    model = sequential_blocks()
    x = data(BATCH, 40, 3, seed=3)
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    # A server that has already served: after a few lengths Keras' predict relaxes its shapes, and
    # the outputs must still not depend on what this process ran before.
    warm = streaming.to_streaming(model, BATCH)
    for a, b in [(0, 1), (1, 9), (9, 24)]:
        warm.predict_on_batch(x[:, a:b])
    stream = streaming.to_streaming(model, BATCH)
    stream(x[:, :25])
    state_path = streaming.save_states(stream, tmp_path / "state")
    uninterrupted = to_numpy(stream(x[:, 25:]))

    np.save(tmp_path / "x.npy", x[:, 25:])
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(RESUME.format(batch=BATCH)))
    subprocess.run(
        [
            sys.executable,
            str(script),
            model_path,
            state_path,
            str(tmp_path / "x.npy"),
            str(tmp_path / "out.npy"),
        ],
        check=True,
        capture_output=True,
        # The package under test, wherever the interpreter's installed copy is.
        env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])},
    )
    resumed = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(resumed, uninterrupted)


def test_million_token_stream_against_float64():
    # 1,000,000 tokens through a stateful Aaren layer in chunks; the reference is the prefix
    # softmax attention in float64 numpy (cumulative sums of exp(score), exact at this scale).
    batch, chunk, total = 4, 20_000, 1_000_000
    layer = Aaren(2, 2, return_sequences=True, stateful=True)
    layer.build((batch, None, 3))
    rng = np.random.default_rng(4)
    checkpoints = [0, 999, 99_999, total - 1]
    got, state_shapes = {}, set()
    for start in range(0, total, chunk):
        x = rng.normal(size=(batch, chunk, 3)).astype("float32")
        # A slow drift makes late scores exceed early ones by far: the running max must move.
        x[..., 0] += 4.0 * (start + np.arange(chunk)) / total
        y = to_numpy(layer(x))
        state_shapes.add(tuple(tuple(v.shape) for v in layer.states))
        for t in checkpoints:
            if start <= t < start + chunk:
                got[t] = y[:, t - start]
    assert state_shapes == {((batch, 3), (batch, 2 + 2 + 2 * 2))}
    assert all(np.all(np.isfinite(to_numpy(v))) for v in layer.states)

    # Rebuild the same stream for the reference, chunk by chunk, in float64.
    rng = np.random.default_rng(4)
    num = den = None
    for start in range(0, total, chunk):
        x = rng.normal(size=(batch, chunk, 3)).astype("float32")
        x[..., 0] += 4.0 * (start + np.arange(chunk)) / total
        scores, values = numpy_projections(layer.cell, x)
        weights = np.exp(scores)  # (B, T, H); scores stay far below float64's exp limit
        cum_den = np.cumsum(weights, axis=1) + (0.0 if den is None else den[:, None])
        cum_num = np.cumsum(weights[..., None] * values, axis=1)
        cum_num = cum_num + (0.0 if num is None else num[:, None])
        for t in checkpoints:
            if start <= t < start + chunk:
                attended = cum_num[:, t - start] / cum_den[:, t - start][..., None]
                expected = numpy_output(layer.cell, attended[:, None])[:, 0]
                np.testing.assert_allclose(
                    got[t], expected, rtol=2e-5, atol=2e-5, err_msg=f"token {t}"
                )
        den, num = cum_den[:, -1], cum_num[:, -1]


def test_reset_states_starts_a_new_stream():
    model = sequential_blocks()
    x = data(BATCH, 6, 3, seed=7)
    stream = streaming.to_streaming(model, BATCH)
    stream(data(BATCH, 5, 3, seed=8))
    assert streaming.reset_states(stream) == 2
    assert_close(stream(x), model(x))


def test_state_functions_refuse_what_is_not_a_model():
    with pytest.raises(
        ValueError, match=r"`model` must be a keras.Model.*Received: model=\[1, 2\]"
    ):
        streaming.get_states([1, 2])
    with pytest.raises(ValueError, match="`model` must be a keras.Model"):
        streaming.reset_states("model")
    stream = streaming.to_streaming(sequential_blocks(), BATCH)
    with pytest.raises(ValueError, match="exactly this model's stateful layers.*Received: list"):
        streaming.set_states(stream, [])
