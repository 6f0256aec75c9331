"""The walk over a model's layers, shared by the state functions and the causality check."""

import keras


def check_layer(name, value):
    """Raise a ValueError naming `name` unless `value` is a Keras layer or model."""
    if not isinstance(value, keras.layers.Layer):
        raise ValueError(
            f"`{name}` must be a keras.Model or keras.layers.Layer. Received: {name}={value!r}"
        )


def is_graph_model(layer):
    """Whether `layer` is a functional or Sequential model, a graph of layers.

    A subclassed model has only its `call`, so it is treated like any other layer.
    """
    return isinstance(layer, keras.Model) and bool(getattr(layer, "inputs", None))


def _sublayers(layer):
    # Models list their layers; wrappers such as Bidirectional hold theirs as attributes.
    children = list(getattr(layer, "layers", []))
    for name in ("forward_layer", "backward_layer", "layer"):
        child = getattr(layer, name, None)
        if isinstance(child, keras.layers.Layer):
            children.append(child)
    return children


def walk(model, prefix=""):
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


def stateful_layers(model):
    """`[(path, layer)]` for every layer below `model` that holds a stream's state."""
    return [
        (path, layer)
        for path, layer in walk(model)
        if getattr(layer, "stateful", False) and getattr(layer, "states", None) is not None
    ]
