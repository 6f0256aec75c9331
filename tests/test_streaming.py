"""keras_aaren.streaming: stateful clones, state checkpoints, the explicit-state step and its
SavedModel and TFLite exports, all against the parallel model on the same inputs."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from helpers import assert_close, data, numpy_output, numpy_projections, to_numpy

from keras_aaren import Aaren, AarenBlock, AarenCell, streaming

BATCH = 2
WIDTH = 8
STEPS = 24


def sequential_blocks():
    return keras.Sequential(
        [
            keras.Input((None, 3)),
            keras.layers.Dense(WIDTH),
            AarenBlock(2, 4, ffn_dim=16),
            AarenBlock(2, 4, ffn_dim=16, norm_first=True),
            keras.layers.Dense(1),
        ]
    )


def functional_mixed():
    # A residual connection around an Aaren layer, a stepped AarenCell and an LSTM: streaming
    # must handle any causal graph, not only stacks.
    inputs = keras.Input((None, 3))
    hidden = keras.layers.Dense(WIDTH)(inputs)
    block = AarenBlock(2, 4, ffn_dim=16)(hidden)
    hidden = keras.layers.Add()([hidden, Aaren(2, 4, return_sequences=True)(block)])
    hidden = keras.layers.RNN(AarenCell(1, 2), return_sequences=True)(hidden)
    outputs = keras.layers.Dense(1)(keras.layers.LSTM(4, return_sequences=True)(hidden))
    return keras.Model(inputs, outputs)


MODELS = {"sequential_blocks": sequential_blocks, "functional_mixed": functional_mixed}


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model_and_data(request):
    model = MODELS[request.param]()
    x = data(BATCH, STEPS, 3, seed=1)
    return model, x, to_numpy(model(x))


def test_to_streaming_chunks_and_tokens(model_and_data):
    model, x, expected = model_and_data
    stream = streaming.to_streaming(model, BATCH)
    assert stream.inputs[0].shape == (BATCH, None, 3)
    tokens = [to_numpy(stream(x[:, t : t + 1])) for t in range(STEPS)]
    assert_close(np.concatenate(tokens, axis=1), expected)
    assert streaming.reset_states(stream) >= 2
    chunks = [to_numpy(stream(x[:, a:b])) for a, b in [(0, 7), (7, 8), (8, STEPS)]]
    assert_close(np.concatenate(chunks, axis=1), expected)


def test_predict_on_batch_continues_the_stream(model_and_data, request):
    model, x, expected = model_and_data
    if keras.backend.backend() == "jax" and "functional_mixed" in request.node.name:
        # Keras' own RNN layers (the LSTM and the stepped AarenCell here) keep their stateful
        # states outside the variables that JAX's compiled predict carries; Aaren layers do not.
        reason = "keras.layers.RNN's stateful states do not survive JAX's compiled predict"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    stream = streaming.to_streaming(model, BATCH)
    bounds = [(0, 1), (1, 9), (9, STEPS)]
    chunks = [stream.predict_on_batch(x[:, a:b]) for a, b in bounds]
    assert_close(np.concatenate(chunks, axis=1), expected)


def test_step_function_matches_parallel(model_and_data):
    model, x, expected = model_and_data
    step = streaming.make_step_function(model, BATCH)
    states = step.initial_states()
    shapes = [tuple(s.shape) for s in states]
    outputs = []
    for t in range(STEPS):
        y, states = step(x[:, t], states)
        outputs.append(to_numpy(y))
        # The state has the same fixed structure whatever the number of tokens seen.
        assert [tuple(s.shape) for s in states] == shapes
    assert_close(np.stack(outputs, axis=1), expected)


def _replay(run, names, x):
    states = {name: np.zeros(shape, "float32") for name, shape in names.items()}
    outputs = []
    for t in range(x.shape[1]):
        result = run(x[:, t], states)
        outputs.append(np.asarray(result["y"]))
        states = {name: np.asarray(result[f"new_{name}"]) for name in names}
    return np.stack(outputs, axis=1)


def _state_shapes(model):
    step = streaming.make_step_model(model, BATCH)
    return {f"state_{i}": tuple(t.shape) for i, t in enumerate(step.inputs[1:])}


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModel is TensorFlow's")
def test_saved_model_step_replays_parallel(model_and_data, tmp_path):
    import tensorflow as tf

    model, x, expected = model_and_data
    path = streaming.export_saved_model(model, tmp_path / "step", BATCH)
    signature = tf.saved_model.load(path).signatures["step"]

    def run(token, states):
        return signature(x=tf.constant(token), **{k: tf.constant(v) for k, v in states.items()})

    assert_close(_replay(run, _state_shapes(model), x), expected)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFLite is TensorFlow's")
def test_tflite_step_replays_parallel(model_and_data, tmp_path):
    import tensorflow as tf

    model, x, expected = model_and_data
    path = streaming.export_tflite(model, tmp_path / "step.tflite", BATCH)
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner("step")
    assert_close(_replay(lambda token, s: runner(x=token, **s), _state_shapes(model), x), expected)


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


@pytest.mark.parametrize(
    "bad_layer, match",
    [
        (
            lambda: keras.layers.Bidirectional(keras.layers.LSTM(2, return_sequences=True)),
            "Bidirectional",
        ),
        (lambda: keras.layers.Conv1D(2, 3, padding="same"), "Conv1D"),
        (lambda: keras.layers.Conv1D(2, 3, padding="causal"), "Conv1D"),
    ],
    ids=["bidirectional", "conv_same", "conv_causal"],
)
def test_non_causal_models_are_refused(bad_layer, match):
    model = keras.Sequential([keras.Input((None, 3)), bad_layer(), Aaren(1, 2)])
    with pytest.raises(ValueError, match=f"{match}.*cannot be served token by token"):
        streaming.to_streaming(model, BATCH)
    with pytest.raises(ValueError, match="cannot be served token by token"):
        streaming.make_step_model(model, BATCH)


def test_bad_streaming_arguments():
    model = sequential_blocks()
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        streaming.to_streaming(model, 0)
    with pytest.raises(ValueError, match="`model` must be a keras.Model"):
        streaming.get_states([1, 2])
    step = streaming.make_step_function(model, BATCH)
    states = step.initial_states()
    with pytest.raises(ValueError, match=r"`x` must be one token .* = \(2, 3\).*\(2, 4\)"):
        step(np.zeros((BATCH, 4), "float32"), states)
    with pytest.raises(ValueError, match="`states` must have shapes"):
        step(np.zeros((BATCH, 3), "float32"), states[:-1])
    inner = keras.Sequential([keras.Input((None, WIDTH)), AarenBlock(2, 4, ffn_dim=8)])
    nested = keras.Sequential([keras.Input((None, 3)), keras.layers.Dense(WIDTH), inner])
    with pytest.raises(ValueError, match="nested model"):
        streaming.make_step_model(nested, BATCH)
    stream = streaming.to_streaming(nested, BATCH)
    x = data(BATCH, 6, 3, seed=5)
    assert_close(
        np.concatenate([to_numpy(stream(x[:, t : t + 1])) for t in range(6)], 1),
        to_numpy(nested(x)),
    )


def test_pointwise_conv_streams():
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.Conv1D(WIDTH, 1), Aaren(2, 4)])
    x = data(BATCH, 9, 3, seed=6)
    stream = streaming.to_streaming(model, BATCH)
    last = [to_numpy(stream(x[:, t : t + 1])) for t in range(9)][-1]
    assert_close(last, to_numpy(model(x)))
