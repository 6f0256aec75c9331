"""Streaming: serve a model trained in parallel one token at a time, in constant memory.

Three forms of the same trained weights:

* `to_streaming(model, batch_size)`: a stateful clone; feed it chunks of any length (one token,
  or many) and it continues where it stopped. `reset_states`, `get_states` / `set_states` and
  `save_states` / `load_states` manage its state, for checkpointing a long-running stream.
* `make_step_model(model, batch_size)`: a stateless Keras model
  `[x_t, *states] -> [y_t, *new_states]`; `make_step_function` compiles it once
  (`tf.function` on TensorFlow) as `step(x_t, states) -> (y_t, new_states)`.
* `export_saved_model(model, path, batch_size)` and `export_tflite(...)`: that step with a
  `step` signature, for deployment without Python or Keras.

The state of every recurrent layer is a fixed list of `(batch_size, size)` tensors (for Aaren:
`[y, c]`, the previous output and the paper's state $(m, u, w)$ in one tensor); its size never
depends on how many tokens were seen. Streaming is exact for models whose layers act causally
along time: Aaren layers and blocks, Keras RNNs, and layers that act on each timestep alone
(Dense, LayerNormalization, Dropout, Masking, ...). Layers that mix timesteps in a way the stream
cannot reproduce (Bidirectional, MultiHeadAttention, pooling over time, Flatten, Conv1D with a
kernel wider than 1, which would need past inputs) are refused with a ValueError.
"""

import keras
import numpy as np

_NON_CAUSAL = (
    "Bidirectional",
    "MultiHeadAttention",
    "Attention",
    "AdditiveAttention",
    "GroupedQueryAttention",
    "GlobalAveragePooling1D",
    "GlobalMaxPooling1D",
    "AveragePooling1D",
    "MaxPooling1D",
    "Flatten",
)


def _sublayers(layer):
    # Models list their layers; wrappers such as Bidirectional hold theirs as attributes.
    children = list(getattr(layer, "layers", []))
    for name in ("forward_layer", "backward_layer", "layer"):
        child = getattr(layer, name, None)
        if isinstance(child, keras.layers.Layer):
            children.append(child)
    return children


def _walk(model, prefix=""):
    """Every layer below `model` (depth first, in order) with a path of layer names."""
    seen = set()

    def visit(layer, path):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        yield path, layer
        for child in _sublayers(layer):
            yield from visit(child, f"{path}/{child.name}" if path else child.name)

    for child in _sublayers(model):
        yield from visit(child, f"{prefix}{child.name}")


def _check_layer(name, value):
    if not isinstance(value, keras.layers.Layer):
        raise ValueError(
            f"`{name}` must be a keras.Model or keras.layers.Layer. Received: {name}={value!r}"
        )


def _stateful_layers(model):
    return [
        (path, layer)
        for path, layer in _walk(model)
        if getattr(layer, "stateful", False) and getattr(layer, "states", None) is not None
    ]


def reset_states(model):
    """Reset the state of every stateful layer in a model (`keras.Model` has no such method).

    Walks nested models and wrappers and calls `reset_state()` on each layer built with
    `stateful=True`, so the next batch starts from "nothing seen yet".

    Args:
        model: a `keras.Model` (or any layer).

    Returns:
        The number of layers that were reset.

    Raises:
        ValueError: if `model` is not a Keras layer or model.

    Examples:

    >>> import numpy as np
    >>> import keras
    >>> from keras_aaren import Aaren
    >>> model = keras.Sequential([
    ...     keras.Input(batch_shape=(2, None, 3)),
    ...     Aaren(num_heads=1, key_dim=4, stateful=True, return_sequences=True),
    ... ])
    >>> _ = model(np.ones((2, 5, 3), "float32"))
    >>> reset_states(model)
    1
    """
    _check_layer("model", model)
    layers = [layer for _, layer in _walk(model) if getattr(layer, "stateful", False)]
    if getattr(model, "stateful", False):
        layers.append(model)
    for layer in layers:
        layer.reset_state()
    return len(layers)


def _check_streamable(model):
    _check_layer("model", model)
    for path, layer in _walk(model):
        name = type(layer).__name__
        # A convolution over time needs the previous kernel_size - 1 inputs, which a stream fed
        # token by token does not keep (even with padding="causal"); only kernel size 1 is
        # per-timestep.
        kernel = getattr(layer, "kernel_size", (1,))
        if name in _NON_CAUSAL or (name == "Conv1D" and tuple(kernel) != (1,)):
            raise ValueError(
                f"Layer '{path}' ({name}) mixes timesteps non-causally or needs past inputs, so "
                "the model cannot be served token by token. Expected only recurrent layers "
                "(Aaren, AarenBlock, Keras RNNs) and per-timestep layers."
            )
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 3:
        shapes = [tuple(x.shape) for x in model.inputs]
        raise ValueError(
            "Streaming expects a model with one input of shape (batch_size, timesteps, "
            f"features). Received input shapes: {shapes}"
        )


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}"
        )


def _clone_with(config_changes):
    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.RNN):
            config.update(config_changes)
        return layer.__class__.from_config(config)

    return clone


def to_streaming(model, batch_size):
    """A stateful copy of a model, for streaming: fixed batch size, any number of timesteps.

    Every recurrent layer (Aaren, AarenBlock, Keras RNNs) becomes `stateful=True`; the weights
    are copied from `model`. Call the copy on chunks of the stream, one token
    (`(batch_size, 1, features)`) or many, and it continues where it stopped; outputs equal
    those of `model` on the whole stream. `reset_states` starts a new stream.

    Args:
        model: a built Sequential or functional model with one input
            `(batch_size, timesteps, features)`.
        batch_size: int, the number of streams served side by side.

    Returns:
        A new `keras.Model` with the same weights.

    Raises:
        ValueError: if `batch_size` is not a positive integer, or the model has a layer that
            mixes timesteps non-causally, or not exactly one 3-D input.

    Examples:

    >>> import numpy as np
    >>> import keras
    >>> from keras_aaren import AarenBlock
    >>> model = keras.Sequential([keras.Input((None, 8)), AarenBlock(2, 4, ffn_dim=16)])
    >>> streaming = to_streaming(model, batch_size=3)
    >>> x = np.random.rand(3, 10, 8).astype("float32")
    >>> tokens = [streaming.predict_on_batch(x[:, t : t + 1]) for t in range(10)]
    >>> expected = model.predict(x, verbose=0)
    >>> bool(np.allclose(np.concatenate(tokens, axis=1), expected, atol=1e-5))
    True
    """
    _check_batch_size(batch_size)
    _check_streamable(model)
    features = model.inputs[0].shape[-1]
    inputs = keras.Input(batch_shape=(batch_size, None, features), name=model.inputs[0].name)
    stateful = _clone_with({"stateful": True})

    def clone_layer(layer):
        # A nested model gets the same fixed batch size: a stateful RNN needs a static one.
        if isinstance(layer, keras.Model):
            return to_streaming(layer, batch_size)
        return stateful(layer)

    clone = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def get_states(model):
    """The complete streaming state of a model: `{layer path: [state arrays]}`.

    Args:
        model: a model with stateful layers, e.g. from `to_streaming`.

    Returns:
        A dict from each stateful layer's path (layer names joined by `/`) to the list of its
        state arrays (numpy, each `(batch_size, size)`), in the model's layer order.

    Raises:
        ValueError: if `model` is not a Keras model or layer.

    Examples:

    >>> import numpy as np
    >>> import keras
    >>> from keras_aaren import Aaren
    >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, name="aaren")])
    >>> streaming = to_streaming(model, batch_size=5)
    >>> _ = streaming(np.ones((5, 7, 3), "float32"))
    >>> {path: [a.shape for a in arrays] for path, arrays in get_states(streaming).items()}
    {'aaren': [(5, 3), (5, 12)]}
    """
    _check_layer("model", model)
    return {
        path: [keras.ops.convert_to_numpy(v.value) for v in layer.states]
        for path, layer in _stateful_layers(model)
    }


def set_states(model, states):
    """Write a complete streaming state (as from `get_states`) into a model.

    Args:
        model: a model with stateful layers.
        states: dict `{layer path: [state arrays]}`.

    Returns:
        None; the model's state variables hold the new values.

    Raises:
        ValueError: if the layer paths differ from the model's (a state from another model), or
            an array's shape differs from the layer's state (e.g. another batch size).

    Examples:

    >>> import numpy as np
    >>> import keras
    >>> from keras_aaren import Aaren
    >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, name="aaren")])
    >>> streaming = to_streaming(model, batch_size=1)
    >>> x = np.random.rand(1, 8, 3).astype("float32")
    >>> _ = streaming.predict_on_batch(x[:, :5])
    >>> saved = get_states(streaming)
    >>> first = streaming.predict_on_batch(x[:, 5:])
    >>> set_states(streaming, saved)  # rewind to after token 5
    >>> bool(np.allclose(streaming.predict_on_batch(x[:, 5:]), first))
    True
    """
    _check_layer("model", model)
    layers = dict(_stateful_layers(model))
    if not isinstance(states, dict) or set(states) != set(layers):
        received = sorted(states) if isinstance(states, dict) else type(states).__name__
        raise ValueError(
            "`states` must hold the state of exactly this model's stateful layers. "
            f"Expected layers: {sorted(layers)}. Received: {received}"
        )
    updates = []
    for path, layer in layers.items():
        arrays = list(states[path])
        expected = [tuple(v.shape) for v in layer.states]
        received = [tuple(np.shape(a)) for a in arrays]
        if expected != received:
            raise ValueError(
                f"The state of layer '{path}' must have shapes {expected} (batch_size, size). "
                f"Received: {received}"
            )
        updates.extend(zip(layer.states, arrays))
    for variable, value in updates:
        variable.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(variable.dtype)))


def save_states(model, path):
    """Save a model's complete streaming state to a `.npz` file, for resuming a stream later.

    The values are stored exactly, so a stream resumed with `load_states` continues bit for bit
    as if it had not stopped.

    Args:
        model: a model with stateful layers.
        path: file path; `.npz` is appended by numpy if missing.

    Returns:
        The path written.

    Examples:

    >>> import os, tempfile
    >>> import numpy as np
    >>> import keras
    >>> from keras_aaren import Aaren
    >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4)])
    >>> streaming = to_streaming(model, batch_size=1)
    >>> _ = streaming(np.ones((1, 4, 3), "float32"))
    >>> path = save_states(streaming, os.path.join(tempfile.mkdtemp(), "stream"))
    >>> os.path.basename(path)
    'stream.npz'
    """
    arrays = {}
    for layer_path, values in get_states(model).items():
        for i, value in enumerate(values):
            arrays[f"{layer_path}:{i}"] = value
    path = str(path)
    np.savez(path, **arrays)
    return path if path.endswith(".npz") else path + ".npz"


def load_states(model, path):
    """Load a streaming state saved by `save_states` into a model.

    Args:
        model: a model with the same stateful layers and batch size as the one saved.
        path: the `.npz` file.

    Returns:
        None; the model's state variables hold the loaded values.

    Raises:
        ValueError: if the file holds the state of another model or of another batch size.

    Examples:

    >>> import os, tempfile
    >>> import numpy as np
    >>> import keras
    >>> from keras_aaren import Aaren
    >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4)])
    >>> streaming = to_streaming(model, batch_size=1)
    >>> x = np.random.rand(1, 9, 3).astype("float32")
    >>> _ = streaming.predict_on_batch(x[:, :6])
    >>> path = save_states(streaming, os.path.join(tempfile.mkdtemp(), "stream.npz"))
    >>> reset_states(streaming)  # e.g. the process restarts
    1
    >>> load_states(streaming, path)
    >>> rest = streaming.predict_on_batch(x[:, 6:])
    >>> bool(np.allclose(rest, model.predict(x, verbose=0), atol=1e-5))
    True
    """
    states = {}
    with np.load(str(path)) as data:
        for key in data.files:
            layer_path, index = key.rsplit(":", 1)
            states.setdefault(layer_path, {})[int(index)] = data[key]
    set_states(model, {k: [v[i] for i in sorted(v)] for k, v in states.items()})


def _step_graph(model, batch_size):
    """Re-run the model's layer graph on one token with explicit states in and out."""
    features = model.inputs[0].shape[-1]
    token = keras.Input(batch_shape=(batch_size, features), name="x")
    tensors = {id(model.inputs[0]): keras.layers.Reshape((1, features))(token)}
    state_inputs, state_outputs = [], []
    # One static timestep: unrolling removes the step loop of Keras RNNs, which TFLite cannot
    # run over variables.
    explicit = _clone_with({"return_state": True, "stateful": False, "unroll": True})
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"Layer '{layer.name}' is a nested model; make_step_model needs a flat model. "
                "Use to_streaming, or build the model without nesting."
            )
        inputs = keras.tree.map_structure(lambda t: tensors[id(t)], layer.input)
        if isinstance(layer, keras.layers.RNN):
            step_layer = explicit(layer)
            # The built cell's sizes: a keras.layers.RNN copies them when constructed, before an
            # Aaren cell knows the size of its output.
            sizes = layer.cell.state_size
            sizes = [sizes] if isinstance(sizes, int) else sizes
            states = [
                keras.Input(batch_shape=(batch_size, size), name=f"{layer.name}_state_{i}")
                for i, size in enumerate(sizes)
            ]
            output, *new_states = step_layer(inputs, initial_state=states)
            step_layer.set_weights(layer.get_weights())
            state_inputs += states
            state_outputs += new_states
        else:
            output = layer(inputs)
        for original, new in zip(keras.tree.flatten(layer.output), keras.tree.flatten(output)):
            tensors[id(original)] = new
    output = tensors[id(model.outputs[0])]
    if len(output.shape) == 3:
        output = keras.layers.Reshape(tuple(output.shape[2:]))(output)
    return keras.Model([token, *state_inputs], [output, *state_outputs], name="step")


def make_step_model(model, batch_size):
    """A stateless Keras model for one token: `[x_t, *states] -> [y_t, *new_states]`.

    `x_t` is `(batch_size, features)`; the states are the `(batch_size, size)` states of every
    recurrent layer in order (for each Aaren layer or block `[y, c]`), all zeros for a new
    stream; `y_t` is the model's output for that token. Recurrent layers are copied (weights
    included); every other layer is shared with `model`.

    Args:
        model: a built Sequential or flat functional model with one input
            `(batch_size, timesteps, features)` and one output.
        batch_size: int, the number of streams served side by side.

    Returns:
        A `keras.Model`; `initial_states(step_model)` gives the zero states.

    Raises:
        ValueError: as `to_streaming`, or for nested models and multiple outputs.

    Examples:

    >>> import numpy as np
    >>> import keras
    >>> from keras_aaren import Aaren
    >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, return_sequences=True)])
    >>> step_model = make_step_model(model, batch_size=1)
    >>> [tuple(t.shape) for t in step_model.inputs]  # x_t, then y and c = (m, u, w)
    [(1, 3), (1, 3), (1, 12)]
    >>> x = np.random.rand(1, 3).astype("float32")
    >>> y, *states = step_model.predict_on_batch([x, *initial_states(step_model)])
    >>> bool(np.allclose(y, model.predict(x[:, None], verbose=0)[:, 0], atol=1e-5))
    True
    """
    _check_batch_size(batch_size)
    _check_streamable(model)
    if len(model.outputs) != 1:
        raise ValueError(
            f"make_step_model expects a model with one output. Received: {len(model.outputs)}"
        )
    return _step_graph(model, batch_size)


def initial_states(step_model):
    """Zero states ("nothing seen yet") for a step model from `make_step_model`.

    Args:
        step_model: a model from `make_step_model`.

    Returns:
        A list of zero numpy arrays, one per state input of `step_model`, in its order.

    Examples:

    >>> import keras
    >>> from keras_aaren import Aaren
    >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4)])
    >>> tuple(s.shape for s in initial_states(make_step_model(model, batch_size=5)))
    ((5, 3), (5, 12))
    """
    return [np.zeros(x.shape, dtype=x.dtype) for x in step_model.inputs[1:]]


def _check_step_inputs(step_model, x, states):
    expected = tuple(step_model.inputs[0].shape)
    if tuple(np.shape(x)) != expected:
        raise ValueError(
            f"`x` must be one token of shape (batch_size, features) = {expected}. "
            f"Received: x.shape={tuple(np.shape(x))}"
        )
    expected_states = [tuple(s.shape) for s in step_model.inputs[1:]]
    received = [tuple(np.shape(s)) for s in states]
    if received != expected_states:
        raise ValueError(f"`states` must have shapes {expected_states}. Received: {received}")


def make_step_function(model, batch_size, jit_compile=None):
    """`step(x_t, states) -> (y_t, new_states)`, compiled once, for serving a stream.

    Args:
        model: as for `make_step_model`.
        batch_size: int, the number of streams served side by side.
        jit_compile: on TensorFlow, passed to `tf.function` (None: TensorFlow's default).

    Returns:
        A function `step(x_t, states)`, with the step model as `step.model` and
        `step.initial_states()` for a new stream. On TensorFlow it is a `tf.function` traced
        once for its fixed shapes, on JAX a `jax.jit` of the step model's stateless call; on
        other backends it calls the step model directly.

    Raises:
        ValueError: as `make_step_model`; when called, if `x_t` or `states` has the wrong shape.

    Examples:

    >>> import numpy as np
    >>> import keras
    >>> from keras_aaren import Aaren
    >>> model = keras.Sequential([keras.Input((None, 4)), Aaren(2, 3, return_sequences=True)])
    >>> step = make_step_function(model, batch_size=2)
    >>> x = np.random.rand(2, 6, 4).astype("float32")
    >>> states = step.initial_states()
    >>> outputs = []
    >>> for t in range(6):
    ...     y, states = step(x[:, t], states)
    ...     outputs.append(keras.ops.convert_to_numpy(y))
    >>> bool(np.allclose(np.stack(outputs, axis=1), model.predict(x, verbose=0), atol=1e-5))
    True
    """
    step_model = make_step_model(model, batch_size)

    def run(x, states):
        inputs = [keras.ops.convert_to_tensor(t) for t in (x, *states)]
        results = step_model(inputs, training=False)
        return results[0], list(results[1:])

    if keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def pure_step(trainable, non_trainable, x, states):
            results, _ = step_model.stateless_call(
                trainable, non_trainable, [x, *states], training=False
            )
            return results[0], list(results[1:])

        def call(x, states):
            # A stateless call takes the weights as arguments: reading them at every call keeps
            # the step on the step model's current weights (after `step.model.set_weights`,
            # say), as the tf.function, which reads its variables, does.
            trainable = [v.value for v in step_model.trainable_variables]
            non_trainable = [v.value for v in step_model.non_trainable_variables]
            return pure_step(trainable, non_trainable, x, states)

    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        signature = [tf.TensorSpec(t.shape, t.dtype) for t in step_model.inputs]
        # Calling the traced concrete function skips tf.function's per-call matching of the
        # arguments against its signature: about 25 us per state tensor, a third of the step of
        # a 4-block model here.
        compiled = tf.function(
            lambda x, *states: run(x, states), input_signature=signature, jit_compile=jit_compile
        ).get_concrete_function()

        def convert(t, spec):
            # NumPy inputs are converted to the signature's dtypes, as tf.function does. Tensors
            # of that dtype (the states a step returned) go in as they are: converting them again
            # costs about 5 us each, and a 4-block Aaren model has 8 states.
            if isinstance(t, tf.Tensor) and t.dtype == spec.dtype:
                return t
            return tf.convert_to_tensor(t, spec.dtype)

        def call(x, states):
            return compiled(*(convert(t, s) for t, s in zip((x, *states), signature)))

    else:
        call = run

    def step(x, states):
        _check_step_inputs(step_model, x, states)
        return call(x, list(states))

    step.model = step_model
    step.initial_states = lambda: initial_states(step_model)
    return step


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
    >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, return_sequences=True)])
    >>> path = export_tflite(model, os.path.join(tempfile.mkdtemp(), "step.tflite"), batch_size=1)
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
