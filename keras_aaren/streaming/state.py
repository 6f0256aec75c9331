"""The state of a stream: reset it, read and write it, save it to a file and load it back.

These functions work on any model with stateful layers, such as the stateful copy that
`keras_aaren.streaming.to_streaming` makes; a layer is named by its path, the names of the
layers that lead to it joined by `/`.
"""

import keras
import numpy as np

from keras_aaren.streaming.walk import check_layer, stateful_layers, walk


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
        >>> from keras_aaren.streaming import reset_states
        >>> model = keras.Sequential([
        ...     keras.Input(batch_shape=(2, None, 3)),
        ...     Aaren(num_heads=1, key_dim=4, stateful=True, return_sequences=True),
        ... ])
        >>> _ = model(np.ones((2, 5, 3), "float32"))
        >>> reset_states(model)
        1
    """
    check_layer("model", model)
    layers = [layer for _, layer in walk(model) if getattr(layer, "stateful", False)]
    if getattr(model, "stateful", False):
        layers.append(model)
    for layer in layers:
        layer.reset_state()
    return len(layers)


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
        >>> from keras_aaren.streaming import get_states, to_streaming
        >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, name="aaren")])
        >>> streaming = to_streaming(model, batch_size=5)
        >>> _ = streaming(np.ones((5, 7, 3), "float32"))
        >>> {path: [a.shape for a in arrays] for path, arrays in get_states(streaming).items()}
        {'aaren': [(5, 3), (5, 12)]}
    """
    check_layer("model", model)
    return {
        path: [keras.ops.convert_to_numpy(v.value) for v in layer.states]
        for path, layer in stateful_layers(model)
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
        >>> from keras_aaren.streaming import get_states, set_states, to_streaming
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
    check_layer("model", model)
    layers = dict(stateful_layers(model))
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
    # Every shape is checked before the first write, so a refused state leaves the model as it was.
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

    Raises:
        ValueError: if `model` is not a Keras model or layer.

    Examples:
        >>> import os, tempfile
        >>> import numpy as np
        >>> import keras
        >>> from keras_aaren import Aaren
        >>> from keras_aaren.streaming import save_states, to_streaming
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
        >>> from keras_aaren.streaming import load_states, reset_states, save_states, to_streaming
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
