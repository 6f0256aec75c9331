"""keras_aaren.streaming.export: the SavedModel and TFLite steps replay the parallel model token
by token, and off TensorFlow both exports refuse with a ValueError."""

import keras
import numpy as np
import pytest
from helpers import assert_close
from streaming_models import BATCH, sequential_blocks

from keras_aaren import streaming


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


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="the exports run there")
@pytest.mark.parametrize("export", ["export_saved_model", "export_tflite"])
def test_exports_need_tensorflow(export, tmp_path):
    with pytest.raises(ValueError, match=f"{export} needs the TensorFlow backend.*Received"):
        getattr(streaming, export)(sequential_blocks(), tmp_path / "step", BATCH)
