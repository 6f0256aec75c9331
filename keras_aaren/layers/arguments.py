"""The constructor arguments the layers share, each defined once: default, meaning, check, config.

Each class writes its signature and its `Args:` out in its own source, so that IDEs, type
checkers and the documentation read them without running the code; `tests/layers/
test_arguments.py` checks that every signature default and every docstring line equals the
definition here. A class lists the groups it takes in its `arguments`; `resolve` turns the
received values into stored ones (validated, identifiers deserialized) and `serialize` does the
reverse for `get_config`.
"""

import dataclasses

import keras

from keras_aaren.ops.scan import check_method
from keras_aaren.validation import check_positive_int


@dataclasses.dataclass(frozen=True)
class Argument:
    """One constructor argument: its name, default, docstring line, and kind.

    `kind` selects how the value is checked, stored and serialized: `"initializer"`,
    `"regularizer"`, `"constraint"`, `"activation"` (through `keras.<kind>s.get` and
    `.serialize`), `"dim"` (a positive int or None), `"rate"` (a float in [0, 1)), `"bool"`,
    `"positive"` (a positive number), `"method"` (a scan method) or `"seed"` (an int or None).
    """

    name: str
    default: object
    doc: str
    kind: str


def _arguments(kind, *rows):
    return tuple(Argument(name, default, doc, kind) for name, default, doc in rows)


# The shape of the attention beyond `num_heads` and `key_dim`, which every class takes first.
VALUE_DIM = _arguments(
    "dim", ("value_dim", None, "int, size of each head's value; defaults to `key_dim`.")
)
OUTPUT_DIM = _arguments(
    "dim", ("output_dim", None, "int, width of the output; defaults to the width of the input.")
)

# The projections' weights: the learned query, the key, value and output kernels (and, in a
# block, its dense layers).
PROJECTION = (
    Argument("use_bias", True, "bool, whether the projections use bias vectors.", "bool"),
    *_arguments(
        "initializer",
        ("kernel_initializer", "glorot_uniform", "initializer of the kernels."),
        ("bias_initializer", "zeros", "initializer of the biases."),
        (
            "query_initializer",
            None,
            "initializer of the learned query token; `None` means `RandomNormal(stddev=1.0)`, "
            "which gives queries of the scale that `MultiHeadAttention` computes from "
            "normalized inputs.",
        ),
    ),
    *_arguments(
        "regularizer",
        ("kernel_regularizer", None, "regularizer of the kernels."),
        ("bias_regularizer", None, "regularizer of the biases."),
        ("query_regularizer", None, "regularizer of the learned query token."),
    ),
    *_arguments(
        "constraint",
        ("kernel_constraint", None, "constraint of the kernels."),
        ("bias_constraint", None, "constraint of the biases."),
        ("query_constraint", None, "constraint of the learned query token."),
    ),
)

# The rest of a Transformer encoder block around the attention.
BLOCK = (
    Argument(
        "ffn_dim",
        None,
        "int, width of the feed-forward network's hidden layer; defaults to `4 * width`.",
        "dim",
    ),
    Argument(
        "activation", "relu", "activation of the feed-forward network's hidden layer.", "activation"
    ),
    Argument(
        "dropout",
        0.0,
        "float in [0, 1), dropout rate after Aaren and after the feed-forward network.",
        "rate",
    ),
    Argument("norm_first", False, "bool, pre-norm (True) or post-norm (False) residuals.", "bool"),
    Argument(
        "layer_norm_epsilon", 1e-5, "float, epsilon of both LayerNormalization layers.", "positive"
    ),
    Argument("seed", None, "int, the random seed of the dropout.", "seed"),
)

# How a sequence layer runs its cell; `keras.layers.RNN`'s arguments, plus the scan `method`.
RECURRENT = (
    Argument(
        "method",
        "auto",
        'how the sequence is computed: `"auto"` (the fastest exact scan for the backend), '
        '`"chunked"`, `"associative"` (the paper\'s parallel prefix scan), or `"sequential"` '
        "(the `keras.layers.RNN` step loop over the cell). See `keras_aaren.ops.aaren_scan`.",
        "method",
    ),
    Argument(
        "return_sequences",
        False,
        "bool, return the output at every timestep, or only the last.",
        "bool",
    ),
    Argument(
        "return_state",
        False,
        "bool, also return the final states `[y, c]` (see the cell).",
        "bool",
    ),
    Argument(
        "go_backwards",
        False,
        "bool, process the sequence backwards and return the reversed sequence.",
        "bool",
    ),
    Argument(
        "stateful",
        False,
        "bool, the final states of a batch are the initial states of the next one.",
        "bool",
    ),
    Argument(
        "unroll", False, 'bool, unroll the step loop; used only by `method="sequential"`.', "bool"
    ),
    Argument(
        "zero_output_for_mask",
        False,
        "bool, output zeros at masked timesteps instead of the previous output (only with "
        "`return_sequences=True`, as in `keras.layers.RNN`).",
        "bool",
    ),
)

_IDENTIFIERS = {
    "initializer": keras.initializers,
    "regularizer": keras.regularizers,
    "constraint": keras.constraints,
    "activation": keras.activations,
}


def _check(argument, value):
    name, kind = argument.name, argument.kind
    if kind == "dim":
        check_positive_int(name, value, allow_none=True)
    elif kind == "rate":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"`{name}` must be a float in [0, 1). Received: {name}={value!r}")
    elif kind == "positive":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"`{name}` must be a positive float. Received: {name}={value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")
    elif kind == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"`{name}` must be an integer or None. Received: {name}={value!r}")
    elif kind == "method":
        check_method(value)


def resolve(arguments, values):
    """The stored values of `arguments`: checked, and identifiers deserialized.

    Args:
        arguments: a tuple of `Argument`s.
        values: dict of the received values; a missing one takes its default.

    Returns:
        A dict from name to stored value.

    Raises:
        ValueError: naming the argument, for a value of the wrong kind.
    """
    stored = {}
    for argument in arguments:
        value = values.get(argument.name, argument.default)
        _check(argument, value)
        if argument.kind in _IDENTIFIERS:
            if argument.name == "query_initializer" and value is None:
                value = keras.initializers.RandomNormal(stddev=1.0)
            value = _IDENTIFIERS[argument.kind].get(value)
        stored[argument.name] = value
    return stored


def serialize(arguments, owner):
    """`get_config` entries of `arguments` as stored on `owner`."""
    config = {}
    for argument in arguments:
        value = getattr(owner, argument.name)
        if argument.kind in _IDENTIFIERS:
            value = _IDENTIFIERS[argument.kind].serialize(value)
        config[argument.name] = value
    return config


def with_defaults(arguments, **defaults):
    """`arguments` with some defaults replaced, for a class whose defaults differ."""
    return tuple(
        dataclasses.replace(a, default=defaults[a.name]) if a.name in defaults else a
        for a in arguments
    )


def expose_cell_arguments(layer_class, cell_class):
    """Give a sequence layer read-only properties for its cell's arguments, as `LSTM` has for
    `LSTMCell`'s (`layer.num_heads` is `layer.cell.num_heads`)."""
    for name in ("num_heads", "key_dim", *(a.name for a in cell_class.arguments)):
        setattr(layer_class, name, _cell_property(name))


def _cell_property(name):
    return property(lambda self: getattr(self.cell, name), doc=f"The cell's `{name}`.")
