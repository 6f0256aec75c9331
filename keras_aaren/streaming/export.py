"""Export of the one-token step for deployment without Python's Keras: a TensorFlow SavedModel,
a LiteRT (TensorFlow Lite) flatbuffer, or an ONNX graph.

All three export the step model of `keras_aaren.streaming.make_step_model` through Keras' own
exporters, with inputs named `x` `(batch_size, features)` and `state_0 ... state_N` (the states
of the recurrent layers in the model's order) and outputs `y` and `new_state_0 ...
new_state_N`; a new stream starts from zeros. They need the TensorFlow backend: Keras exports
LiteRT and ONNX from TensorFlow graphs (ONNX with `tf2onnx`). The files run in LiteRT's own
interpreter (`ai-edge-litert`) and in ONNX Runtime; `pip install keras_aaren[deploy]` installs
both and the converters.

The step model calls each recurrent layer's cell once per token (for Aaren,
`keras_aaren.ops.recurrence.aaren_step_flat`), so the exported graphs hold no loop and no scan
(the parallel scan is, on TensorFlow, an XLA-compiled nested function that `tf2onnx` cannot
convert), and the state lives in their inputs and outputs, not in variables.

At one token, a runtime's time goes to the number of ops it runs more than to their arithmetic,
so the unquantized LiteRT and ONNX steps spread each head's scales over its value columns with
a product by a constant 0/1 matrix, one op where a reshaped broadcast takes several (see
`aaren_step_flat`). Quantized steps broadcast instead: a quantizer would round that product's
inputs, and the state with them. Quantize with these functions' `quantization` argument, not
by running a quantizer over an unquantized file.
"""

import tempfile
import warnings

import keras
import numpy as np

from keras_aaren.layers.base import token_spread
from keras_aaren.streaming.convert import make_step_model
from keras_aaren.validation import check_shape

#: The `quantization` values that `export_tflite` takes.
TFLITE_QUANTIZATIONS = (None, "float16", "dynamic_int8", "full_int8")
#: The `quantization` values that `export_onnx` takes.
ONNX_QUANTIZATIONS = (None, "dynamic_int8")

# TFLite ops that `full_int8` keeps in float32: every op of the step except the matrix products
# (FULLY_CONNECTED, BATCH_MATMUL). They compute the recurrent state, whose running sums grow
# with the number of tokens seen and whose running maximum starts at the lowest float: no range
# calibrated on a finite dataset holds them (quantized, the first SUB of the running maximum
# cannot even be prepared), and they are a small share of the step's work.
_FLOAT_OPS = (
    "ADD",
    "SUB",
    "MUL",
    "DIV",
    "EXP",
    "LOG",
    "SIGN",
    "NEG",
    "MAXIMUM",
    "MINIMUM",
    "GREATER",
    "SELECT_V2",
    "CONCATENATION",
    "RESHAPE",
    "STRIDED_SLICE",
    "SPLIT",
    "SPLIT_V",
    "UNPACK",
    "MEAN",
    "SQUARED_DIFFERENCE",
    "RSQRT",
    "LOGISTIC",
    "TANH",
    "RELU",
    "GELU",
    "SOFTMAX",
)


def _check_tensorflow(name):
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"{name} needs the TensorFlow backend. "
            f"Received: KERAS_BACKEND={keras.backend.backend()}"
        )


def _check_quantization(quantization, allowed, representative_data):
    if quantization not in allowed:
        raise ValueError(
            f"`quantization` must be one of {allowed}. Received: quantization={quantization!r}"
        )
    if quantization == "full_int8" and representative_data is None:
        raise ValueError(
            "`representative_data` must be given for quantization='full_int8': input "
            "sequences (samples, timesteps, features) to calibrate on. "
            "Received: representative_data=None"
        )
    if quantization != "full_int8" and representative_data is not None:
        raise ValueError(
            "`representative_data` is used only with quantization='full_int8'. "
            f"Received: quantization={quantization!r} with representative_data"
        )


def _named_step(model, batch_size):
    """The step model with named inputs and a dict of named outputs, and its input signature."""
    import tensorflow as tf

    step = make_step_model(model, batch_size)
    names = ["x"] + [f"state_{i}" for i in range(len(step.inputs) - 1)]
    inputs = [
        keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=name)
        for t, name in zip(step.inputs, names)
    ]
    results = step(inputs)
    outputs = {"y": results[0], **{f"new_{n}": r for n, r in zip(names[1:], results[1:])}}
    named = keras.Model(inputs, outputs, name="step")
    signature = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in inputs]
    return named, signature


def _write_saved_model(named, signature, path, endpoint):
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(named)

    def step(*inputs):
        return named(list(inputs), training=False)

    archive.add_endpoint(endpoint, tf.function(step, input_signature=signature))
    archive.write_out(str(path), verbose=False)


def _calibration(named, signature, representative_data):
    """The step's inputs `{x, state_i}` at every token of the representative sequences."""
    batch_size, features = signature[0].shape
    data = np.asarray(representative_data, dtype=signature[0].dtype.as_numpy_dtype)
    check_shape(
        "representative_data", data.shape, (None, None, features), "(samples, timesteps, features)"
    )
    if data.shape[0] % batch_size or data.shape[1] == 0:
        raise ValueError(
            "`representative_data` must hold a multiple of batch_size sequences of at least one "
            f"timestep. Received: representative_data.shape={data.shape} with "
            f"batch_size={batch_size}"
        )
    samples = []
    for start in range(0, data.shape[0], batch_size):
        states = {s.name: np.zeros(s.shape, s.dtype.as_numpy_dtype) for s in signature[1:]}
        for t in range(data.shape[1]):
            token = data[start : start + batch_size, t]
            samples.append({"x": token, **states})
            results = named([token, *states.values()], training=False)
            states = {name: keras.ops.convert_to_numpy(results[f"new_{name}"]) for name in states}
    return samples


def export_saved_model(model, path, batch_size):
    """Export the one-token step as a TensorFlow SavedModel with a `step` signature.

    The signature takes `x` `(batch_size, features)` and `state_0 ... state_N` and returns `y`
    and `new_state_0 ... new_state_N`: load it with `tf.saved_model.load(path)` and call
    `loaded.signatures["step"](x=..., state_0=..., ...)`; pass zeros for a new stream. It is
    written by Keras' `keras.export.ExportArchive`, the exporter behind
    `model.export(format="tf_saved_model")`, which names its one endpoint `serve`; the archive
    names it `step`.

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
    _check_tensorflow("export_saved_model")
    named, signature = _named_step(model, batch_size)
    _write_saved_model(named, signature, path, "step")
    return str(path)


def export_tflite(model, path, batch_size, quantization=None, representative_data=None):
    """Export the one-token step as a LiteRT (TensorFlow Lite) flatbuffer.

    The file has one signature (Keras' `serving_default`) with the inputs and outputs of
    `export_saved_model`; run it with LiteRT's interpreter (`pip install ai-edge-litert`):
    `Interpreter(model_path=path).get_signature_runner()(x=..., state_0=..., ...)`. Inputs,
    outputs and the state are float32 in every precision, and every op outside the matrix
    products runs in float32, so the running sums of Aaren's state keep their range over
    unbounded streams.

    Written by Keras' `model.export(path, format="litert")`, with the converter's options for
    `quantization`:

    * `None`: float32.
    * `"float16"`: float16 weights, computed in float32 (half the file).
    * `"dynamic_int8"`: int8 weights; the matrix products quantize their inputs as they run.
    * `"full_int8"`: int8 weights and int8 activations at the matrix products, with ranges
      calibrated on the step's inputs along `representative_data` replayed token by token.
      This one is converted by TensorFlow's selective quantization
      (`tf.lite.experimental.QuantizationDebugger` with `denylisted_ops`) from the SavedModel of
      `model.export`: `model.export` quantizes every op it can, the state's ops included,
      whose ranges no finite calibration holds (the running maximum starts at the lowest float,
      and a quantized subtraction of it cannot be prepared by the interpreter).

    Args:
        model: as for `make_step_model`.
        path: the file to write; its name must end with `.tflite`.
        batch_size: int, the number of streams served side by side.
        quantization: one of `None`, `"float16"`, `"dynamic_int8"`, `"full_int8"`.
        representative_data: for `"full_int8"` only: input sequences, an array
            `(samples, timesteps, features)` with `samples` a multiple of `batch_size`.

    Returns:
        The path written.

    Raises:
        ValueError: as `export_saved_model`, for an unknown `quantization`, or for
            `representative_data` missing, unused or of the wrong shape.

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> import keras
        >>> from ai_edge_litert.interpreter import Interpreter
        >>> from keras_aaren import Aaren
        >>> from keras_aaren.streaming import export_tflite
        >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, return_sequences=True)])
        >>> path = os.path.join(tempfile.mkdtemp(), "step.tflite")
        >>> path = export_tflite(model, path, batch_size=1)
        >>> step = Interpreter(model_path=path).get_signature_runner()
        >>> x = np.random.rand(1, 3).astype("float32")
        >>> sizes = [3, 12]  # y, then c = (m, u, w): 2 + 2 + 2 * 4
        >>> states = {f"state_{i}": np.zeros((1, n), "float32") for i, n in enumerate(sizes)}
        >>> out = step(x=x, **states)
        >>> bool(np.allclose(out["y"], model(x[:, None])[:, 0], atol=1e-5))
        True
    """
    _check_tensorflow("export_tflite")
    _check_quantization(quantization, TFLITE_QUANTIZATIONS, representative_data)
    import tensorflow as tf

    named, signature = _named_step(model, batch_size)
    if quantization == "full_int8":
        samples = _calibration(named, signature, representative_data)
        with tempfile.TemporaryDirectory() as saved:
            # "serve" is written as the SavedModel's `serving_default`, the key of the other
            # precisions' signature.
            _write_saved_model(named, signature, saved, "serve")
            converter = tf.lite.TFLiteConverter.from_saved_model(saved)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: iter(samples)
            with warnings.catch_warnings():
                # The debugger checks its model in TensorFlow's deprecated interpreter; the
                # flatbuffer it writes is the same for LiteRT's.
                warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=converter,
                    debug_dataset=lambda: iter(samples),
                    debug_options=tf.lite.experimental.QuantizationDebugOptions(
                        denylisted_ops=list(_FLOAT_OPS)
                    ),
                )
                flatbuffer = debugger.get_nondebug_quantized_model()
        with open(str(path), "wb") as f:
            f.write(flatbuffer)
        return str(path)
    options = {}
    if quantization is not None:
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        options["target_spec"] = {"supported_types": [tf.float16]}
    with token_spread("broadcast" if quantization else "product"):
        named.export(
            str(path), format="litert", input_signature=[signature], verbose=False, **options
        )
    return str(path)


def export_onnx(model, path, batch_size, quantization=None):
    """Export the one-token step as an ONNX graph, for ONNX Runtime.

    The graph's inputs and outputs are those of `export_saved_model`:
    `onnxruntime.InferenceSession(path).run(["y", "new_state_0", ...], {"x": ..., "state_0":
    ..., ...})`. Written by Keras' `model.export(path, format="onnx")`, which converts the
    TensorFlow graph with `tf2onnx` (`pip install tf2onnx onnx`).

    Args:
        model: as for `make_step_model`.
        path: the `.onnx` file to write.
        batch_size: int, the number of streams served side by side.
        quantization: `None` (float32) or `"dynamic_int8"`: int8 weights of the matrix
            products, whose inputs are quantized as they run
            (`onnxruntime.quantization.quantize_dynamic`); the state stays float32.

    Returns:
        The path written.

    Raises:
        ValueError: as `export_saved_model`, or for an unknown `quantization`.

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> import keras
        >>> import onnxruntime
        >>> from keras_aaren import Aaren
        >>> from keras_aaren.streaming import export_onnx
        >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, return_sequences=True)])
        >>> path = export_onnx(model, os.path.join(tempfile.mkdtemp(), "step.onnx"), batch_size=1)
        >>> session = onnxruntime.InferenceSession(path)
        >>> x = np.random.rand(1, 3).astype("float32")
        >>> sizes = [3, 12]  # y, then c = (m, u, w): 2 + 2 + 2 * 4
        >>> states = {f"state_{i}": np.zeros((1, n), "float32") for i, n in enumerate(sizes)}
        >>> y, *new_states = session.run(["y", "new_state_0", "new_state_1"], {"x": x, **states})
        >>> bool(np.allclose(y, model(x[:, None])[:, 0], atol=1e-5))
        True
    """
    _check_tensorflow("export_onnx")
    _check_quantization(quantization, ONNX_QUANTIZATIONS, None)
    named, signature = _named_step(model, batch_size)
    if quantization is None:
        with token_spread("product"):
            named.export(str(path), format="onnx", input_signature=[signature], verbose=False)
        return str(path)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        float_path = f"{folder}/step.onnx"
        named.export(float_path, format="onnx", input_signature=[signature], verbose=False)
        quantize_dynamic(float_path, str(path), weight_type=QuantType.QInt8)
    return str(path)
