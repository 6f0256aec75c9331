"""keras_aaren.streaming.export: the SavedModel, LiteRT and ONNX steps replay the parallel model
token by token in TensorFlow, LiteRT's interpreter and ONNX Runtime; quantized steps follow the
float32 step over a long stream with a float32 state; bad arguments and other backends are
refused with a ValueError."""

import collections
import os

import keras
import numpy as np
import pytest
from helpers import assert_close, data, to_numpy
from streaming_models import (
    BATCH,
    STEPS,
    every_recurrent_kind,
    functional_mixed,
    prefix_outputs,
    sequential_blocks,
)

from keras_aaren import Aaren, AarenBlock, streaming

on_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the exports convert TensorFlow graphs (SavedModel, LiteRT, tf2onnx)",
)


def _replay(run, names, x):
    """Feed `x` token by token to `run(token, states) -> {y, new_<state>}`, from zero states."""
    states = {name: np.zeros(shape, "float32") for name, shape in names.items()}
    outputs = []
    for t in range(x.shape[1]):
        result = run(x[:, t], states)
        outputs.append(np.asarray(result["y"]))
        states = {name: np.asarray(result[f"new_{name}"]) for name in names}
    return np.stack(outputs, axis=1), states


def _state_shapes(model, batch_size=BATCH):
    step = streaming.make_step_model(model, batch_size)
    return {f"state_{i}": tuple(t.shape) for i, t in enumerate(step.inputs[1:])}


def _litert(path):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path, num_threads=1).get_signature_runner()
    return lambda token, states: runner(x=token, **states)


def _onnxruntime(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    return lambda token, states: dict(zip(outputs, session.run(outputs, {"x": token, **states})))


@pytest.fixture(scope="module")
def mixed_and_data():
    """The functional model with Aaren, AarenBlock, an AarenCell, an LSTM and a residual Add."""
    model = functional_mixed()
    x = data(BATCH, STEPS, 3, seed=1)
    return model, x, to_numpy(model(x))


@on_tensorflow
def test_saved_model_step_replays_parallel(model_and_data, tmp_path):
    import tensorflow as tf

    model, x, expected = model_and_data
    path = streaming.export_saved_model(model, tmp_path / "step", BATCH)
    signature = tf.saved_model.load(path).signatures["step"]

    def run(token, states):
        return signature(x=tf.constant(token), **{k: tf.constant(v) for k, v in states.items()})

    assert_close(_replay(run, _state_shapes(model), x)[0], expected)


@on_tensorflow
def test_litert_step_replays_parallel(mixed_and_data, tmp_path):
    model, x, expected = mixed_and_data
    path = streaming.export_tflite(model, str(tmp_path / "step.tflite"), BATCH)
    assert_close(_replay(_litert(path), _state_shapes(model), x)[0], expected, atol=1e-5)


@on_tensorflow
def test_onnx_step_replays_parallel(mixed_and_data, tmp_path):
    model, x, expected = mixed_and_data
    path = streaming.export_onnx(model, str(tmp_path / "step.onnx"), BATCH)
    assert_close(_replay(_onnxruntime(path), _state_shapes(model), x)[0], expected, atol=1e-5)


@on_tensorflow
def test_onnx_step_of_a_block_is_small(tmp_path):
    # At one token a runtime's time goes to the number of ops it runs. The unquantized ONNX step
    # of a block has neither reshapes, slices, selects nor casts, and ONNX Runtime fuses each of
    # its LayerNormalizations into one op.
    import onnx
    import onnxruntime

    model = keras.Sequential([keras.Input((None, 64)), AarenBlock(4, 16)])
    path = streaming.export_onnx(model, str(tmp_path / "step.onnx"), 1)
    nodes = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert not {"Reshape", "Unsqueeze", "Slice", "Where", "Not", "Cast", "Expand"} & set(nodes)
    assert sum(nodes.values()) <= 48, nodes
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    optimized = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert optimized.count("LayerNormalization") == 2


@on_tensorflow
@pytest.mark.parametrize("runtime", ["litert", "onnx"])
def test_every_kind_of_recurrent_layer_exports(runtime, tmp_path):
    # Keras' GRU, SimpleRNN and LSTM, a stack of cells, and an Aaren layer whose last output
    # feeds the head: each token's output is the parallel model's on the prefix up to it.
    model = every_recurrent_kind()
    x = data(BATCH, 6, 3, seed=6)
    if runtime == "litert":
        run = _litert(streaming.export_tflite(model, str(tmp_path / "step.tflite"), BATCH))
    else:
        run = _onnxruntime(streaming.export_onnx(model, str(tmp_path / "step.onnx"), BATCH))
    outputs, _ = _replay(run, _state_shapes(model), x)
    for t, expected in enumerate(prefix_outputs(model, x, range(x.shape[1]))):
        assert_close(outputs[:, t], expected, atol=1e-6, what=f"token {t}")


# Quantized streams: a model wide enough that LiteRT quantizes its matrices (it leaves weight
# tensors under 1024 elements in float32), batch 1, and a stream long enough for Aaren's running
# sums to pass any range seen in calibration (they grow with every token).
QUANTIZED_TOKENS = 5000
WIDE = 32


def _wide_mixed():
    inputs = keras.Input((None, 3))
    hidden = keras.layers.Dense(WIDE)(inputs)
    block = AarenBlock(4, 8, ffn_dim=2 * WIDE)(hidden)
    hidden = keras.layers.Add()([hidden, Aaren(4, 8, return_sequences=True)(block)])
    outputs = keras.layers.Dense(1)(keras.layers.LSTM(WIDE, return_sequences=True)(hidden))
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def wide_stream(tmp_path_factory):
    """The wide model, a long stream, and the float32 LiteRT step's outputs and final states."""
    keras.utils.set_random_seed(0)
    model = _wide_mixed()
    folder = tmp_path_factory.mktemp("quantized")
    x = data(1, QUANTIZED_TOKENS, 3, seed=3)
    path = streaming.export_tflite(model, str(folder / "float32.tflite"), 1)
    outputs, states = _replay(_litert(path), _state_shapes(model, 1), x)
    return model, folder, x, path, outputs, states


# (runtime, quantization, tolerance on y and on the final states relative to their largest
# value, largest file size relative to float32). float16 rounds the weights only; the int8
# steps round the matrix products' inputs too, full_int8 to ranges calibrated on 64 tokens.
# The graph itself is a larger share of the ONNX file, whose small matrices stay float32.
QUANTIZED = [
    ("litert", "float16", 1e-3, 0.7),
    ("litert", "dynamic_int8", 0.05, 0.7),
    ("litert", "full_int8", 0.25, 0.7),
    ("onnx", "dynamic_int8", 0.05, 0.85),
]


@on_tensorflow
@pytest.mark.parametrize("runtime, quantization, tolerance, size", QUANTIZED)
def test_quantized_stream_follows_float32(wide_stream, runtime, quantization, tolerance, size):
    model, folder, x, float_path, expected, expected_states = wide_stream
    if runtime == "litert":
        representative = data(4, 16, 3, seed=5) if quantization == "full_int8" else None
        path = streaming.export_tflite(
            model,
            str(folder / f"{quantization}.tflite"),
            1,
            quantization=quantization,
            representative_data=representative,
        )
        run, reference_size = _litert(path), os.path.getsize(float_path)
    else:
        reference = streaming.export_onnx(model, str(folder / "float32.onnx"), 1)
        path = streaming.export_onnx(model, str(folder / "int8.onnx"), 1, quantization=quantization)
        run, reference_size = _onnxruntime(path), os.path.getsize(reference)
    # The weights are stored in fewer bits.
    assert os.path.getsize(path) < size * reference_size
    outputs, states = _replay(run, _state_shapes(model, 1), x)
    assert np.isfinite(outputs).all()
    assert np.abs(outputs - expected).max() <= tolerance * np.abs(expected).max()
    for name, state in states.items():
        # The state crosses the interface in float32, and its running sums stay in range.
        assert state.dtype == np.float32, name
        scale = np.abs(expected_states[name]).max()
        assert np.abs(state - expected_states[name]).max() <= tolerance * scale, name


@on_tensorflow
@pytest.mark.parametrize(
    "export, kwargs, message",
    [
        ("export_tflite", {"quantization": "int4"}, "`quantization` must be one of.*int4"),
        ("export_onnx", {"quantization": "float16"}, "`quantization` must be one of.*float16"),
        ("export_tflite", {"quantization": "full_int8"}, "`representative_data` must be given"),
        (
            "export_tflite",
            {"quantization": "float16", "representative_data": np.zeros((1, 4, 3))},
            "`representative_data` is used only with quantization='full_int8'",
        ),
        (
            "export_tflite",
            {"quantization": "full_int8", "representative_data": np.zeros((1, 4, 5))},
            r"`representative_data` must have shape.*representative_data.shape=\(1, 4, 5\)",
        ),
        (
            "export_tflite",
            {"quantization": "full_int8", "representative_data": np.zeros((3, 4, 3))},
            "multiple of batch_size.*Received: representative_data.shape=\\(3, 4, 3\\)",
        ),
    ],
)
def test_export_arguments_are_checked(export, kwargs, message, tmp_path):
    model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, return_sequences=True)])
    with pytest.raises(ValueError, match=message):
        getattr(streaming, export)(model, str(tmp_path / "step.tflite"), BATCH, **kwargs)


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="the exports run there")
@pytest.mark.parametrize("export", ["export_saved_model", "export_tflite", "export_onnx"])
def test_exports_need_tensorflow(export, tmp_path):
    with pytest.raises(ValueError, match=f"{export} needs the TensorFlow backend.*Received"):
        getattr(streaming, export)(sequential_blocks(), tmp_path / "step", BATCH)
