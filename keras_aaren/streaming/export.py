"""Export of the one-token step for deployment without Python or Keras: a TensorFlow
SavedModel, or a TensorFlow Lite flatbuffer, each with a `step` signature.

Both build the step model of `keras_aaren.streaming.make_step_model` and need the TensorFlow
backend.
"""

import keras

from keras_aaren.streaming.convert import make_step_model


def _step_module(model, batch_size):
    import tensorflow as tf

    step_model = make_step_model(model, batch_size)
    names = ["x"] + [f"state_{i}" for i in range(len(step_model.inputs) - 1)]
    signature = [
        tf.TensorSpec(t.shape, t.dtype, name=name) for t, name in zip(step_model.inputs, names)
    ]

    module = tf.Module()
    # Tracked by the module, so the SavedModel carries the weights.
    module.step_model = step_model

    @tf.function(input_signature=signature)
    def step(*inputs):
        results = step_model(list(inputs), training=False)
        return {"y": results[0], **{f"new_{n}": r for n, r in zip(names[1:], results[1:])}}

    module.step = step
    return module


def export_saved_model(model, path, batch_size):
    """Export the one-token step as a TensorFlow SavedModel with a `step` signature.

    The signature takes `x` `(batch_size, features)` and `state_0 ... state_N` and returns `y`
    and `new_state_0 ... new_state_N`: load it with `tf.saved_model.load(path)` and call
    `loaded.signatures["step"](x=..., state_0=..., ...)`; pass zeros for a new stream.

    Args:
        model: as for `make_step_model`.
        path: directory to write.
        batch_size: int, the number of streams served side by side.

    Returns:
        The path written.

    Raises:
        ValueError: as `make_step_model`, or on a backend other than TensorFlow.

    Examples:
        >>> import tempfile
        >>> import numpy as np
        >>> import keras
        >>> import tensorflow as tf
        >>> from keras_aaren import Aaren
        >>> from keras_aaren.streaming import export_saved_model
        >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, return_sequences=True)])
        >>> path = export_saved_model(model, tempfile.mkdtemp(), batch_size=1)
        >>> step = tf.saved_model.load(path).signatures["step"]
        >>> x = np.random.rand(1, 3).astype("float32")
        >>> sizes = [3, 12]  # y, then c = (m, u, w): 2 + 2 + 2 * 4
        >>> states = {f"state_{i}": tf.zeros((1, n)) for i, n in enumerate(sizes)}
        >>> out = step(x=tf.constant(x), **states)
        >>> bool(np.allclose(out["y"], model(x[:, None])[:, 0], atol=1e-5))
        True
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "export_saved_model needs the TensorFlow backend. "
            f"Received: KERAS_BACKEND={keras.backend.backend()}"
        )
    import tensorflow as tf

    module = _step_module(model, batch_size)
    tf.saved_model.save(module, str(path), signatures={"step": module.step})
    return str(path)


def export_tflite(model, path, batch_size):
    """Export the one-token step as a TensorFlow Lite model with a `step` signature.

    Inputs and outputs are named as in `export_saved_model`. Run it with the TFLite (LiteRT)
    interpreter: `interpreter.get_signature_runner("step")(x=..., state_0=..., ...)`.

    Args:
        model: as for `make_step_model`.
        path: the `.tflite` file to write.
        batch_size: int, the number of streams served side by side.

    Returns:
        The path written.

    Raises:
        ValueError: as `export_saved_model`.

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> import keras
        >>> import tensorflow as tf
        >>> from keras_aaren import Aaren
        >>> from keras_aaren.streaming import export_tflite
        >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, return_sequences=True)])
        >>> path = os.path.join(tempfile.mkdtemp(), "step.tflite")
        >>> path = export_tflite(model, path, batch_size=1)
        >>> step = tf.lite.Interpreter(model_path=path).get_signature_runner("step")
        >>> x = np.random.rand(1, 3).astype("float32")
        >>> sizes = [3, 12]  # y, then c = (m, u, w): 2 + 2 + 2 * 4
        >>> states = {f"state_{i}": np.zeros((1, n), "float32") for i, n in enumerate(sizes)}
        >>> out = step(x=x, **states)
        >>> bool(np.allclose(out["y"], model(x[:, None])[:, 0], atol=1e-5))
        True
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "export_tflite needs the TensorFlow backend. "
            f"Received: KERAS_BACKEND={keras.backend.backend()}"
        )
    import tempfile

    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    module = _step_module(model, batch_size)
    # Freeze the weights into the graph first: left as resource variables, the converter keeps
    # them as variables that the TFLite interpreter never initializes.
    concrete = module.step.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    holder = tf.Module()
    # The frozen function returns a flat list; repack it into the named outputs of the step.
    holder.step = tf.function(
        lambda *inputs: tf.nest.pack_sequence_as(
            concrete.structured_outputs, tf.nest.flatten(frozen(*inputs))
        ),
        input_signature=module.step.input_signature,
    )
    with tempfile.TemporaryDirectory() as saved:
        # A frozen graph cannot carry the scan's custom gradient, and inference needs none.
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        tf.saved_model.save(holder, saved, signatures={"step": holder.step}, options=options)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["step"])
        flatbuffer = converter.convert()
    with open(str(path), "wb") as f:
        f.write(flatbuffer)
    return str(path)
