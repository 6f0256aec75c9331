"""Streaming: serving a model with Aaren layers token by token."""

import keras


def _sublayers(layer):
    # Models list their layers; wrappers such as Bidirectional hold theirs as attributes.
    children = list(getattr(layer, "layers", []))
    for name in ("forward_layer", "backward_layer", "layer"):
        child = getattr(layer, name, None)
        if isinstance(child, keras.layers.Layer):
            children.append(child)
    return children


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

    Example:

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
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"`model` must be a keras.Model or keras.layers.Layer. Received: model={model!r}"
        )
    count = 0
    pending, seen = [model], set()
    while pending:
        layer = pending.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if getattr(layer, "stateful", False) and hasattr(layer, "reset_state"):
            layer.reset_state()
            count += 1
        pending.extend(_sublayers(layer))
    return count
