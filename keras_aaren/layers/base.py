"""The Keras plumbing shared by the parallel layers: a `keras.layers.RNN` whose cell can also
compute a whole sequence at once.

Shape letters used in this module: B batch, T timesteps, F input features, O output features.
"""

import keras
from keras import ops

from keras_aaren.ops.scan import check_method


def check_positive_int(name, value, allow_none=False):
    """Raise a ValueError naming `name` unless `value` is a positive int (or None if allowed)."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")


def check_float(layer, inputs):
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if "float" not in dtype:
        raise ValueError(
            f"Layer '{layer.name}' expects floating-point `inputs`; cast or embed integer data "
            f"first (e.g. with keras.layers.Embedding). Received: inputs.dtype={dtype}"
        )


def check_token_shape(layer, input_shape):
    if len(input_shape) != 2 or input_shape[-1] is None:
        raise ValueError(
            f"Layer '{layer.name}' expects one token of shape (batch_size, features) with a "
            f"known `features`. Received: input_shape={tuple(input_shape)}"
        )


def cell_attribute(name):
    """A read-only property of a sequence layer that returns its cell's attribute `name`."""
    return property(lambda self: getattr(self.cell, name), doc=f"The cell's `{name}`.")


def _dims_match(got, expected):
    return len(got) == len(expected) and all(
        g is None or e is None or g == e for g, e in zip(got, expected)
    )


def _carry_last_real(outputs, mask):
    """Each step's output replaced by that of the last real step up to it; 0 before any.

    outputs: (B, T, O); mask: (B, T) bool. A gather, so it compiles under XLA like the scan.
    """
    steps = ops.shape(mask)[1]
    position = ops.arange(steps)
    # Sorting real steps before masked ones (keys are unique) lists the real positions in order;
    # the c-th real position is where a step that has seen c real tokens takes its output from.
    order = ops.argsort(ops.where(mask, position, position + steps), axis=1)  # (B, T)
    count = ops.cumsum(ops.cast(mask, "int32"), axis=1)  # (B, T)
    source = ops.take_along_axis(order, ops.maximum(count - 1, 0), axis=1)  # (B, T)
    index = ops.repeat(source[..., None], outputs.shape[-1], axis=-1)  # (B, T, O)
    carried = ops.take_along_axis(outputs, index, axis=1)
    return ops.where((count > 0)[..., None], carried, ops.zeros_like(carried))


class ParallelRNN(keras.layers.RNN):
    """A `keras.layers.RNN` that computes the whole sequence with its cell's parallel form.

    The cell implements the usual one-token `call(inputs, states)`, whose first state is the
    previous output (Keras' convention: its JAX loop outputs that state at a masked timestep),
    and also `call_sequence(sequences, states, mask, method, last_only, training)`, which takes
    the other states, and returns the outputs of every timestep (or of the last one) and the
    final other states in one pass. This class replaces `keras.layers.RNN.inner_loop` with that
    call, seeded by the incoming state, tracks the previous output itself, and keeps everything
    else of `keras.layers.RNN`: `return_sequences`, `return_state`, `initial_state`, `stateful`,
    `go_backwards`, `zero_output_for_mask` and masking mean what they mean there.
    `method="sequential"` runs `keras.layers.RNN`'s step loop over the cell instead.

    Args:
        cell: the cell, with `call`, `call_sequence`, `state_size` and `output_size`; its
            `state_size` may depend on the input width, and is read again after `build`.
        method: passed to the cell's `call_sequence`; `"sequential"` steps the cell.
        **kwargs: the arguments of `keras.layers.RNN`.
    """

    def __init__(self, cell, method="auto", **kwargs):
        check_method(method)
        super().__init__(cell, **kwargs)
        self.method = method
        self.supports_masking = True

    def build(self, sequences_shape, initial_state_shape=None):
        if len(sequences_shape) != 3 or sequences_shape[-1] is None:
            raise ValueError(
                f"Layer '{self.name}' expects `sequences` of shape "
                "(batch_size, timesteps, features) with a known `features`. "
                f"Received: sequences.shape={tuple(sequences_shape)}"
            )
        super().build(sequences_shape, initial_state_shape)
        # keras.layers.RNN copies the cell's state sizes when constructed; the previous output's
        # size is known only once the cell is built.
        self.state_size = list(self.cell.state_size)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        check_float(self, sequences)
        batch, steps = sequences.shape[0], sequences.shape[1]
        if mask is not None and not _dims_match(tuple(mask.shape), (batch, steps)):
            raise ValueError(
                f"Layer '{self.name}' expects `mask` of shape (batch_size, timesteps) = "
                f"{(batch, steps)}. Received: mask.shape={tuple(mask.shape)}"
            )
        if initial_state is not None:
            states = initial_state if isinstance(initial_state, (list, tuple)) else [initial_state]
            shapes = [tuple(s.shape) for s in states]
            expected = [(batch, size) for size in self.cell.state_size]
            if len(shapes) != len(expected) or not all(map(_dims_match, shapes, expected)):
                raise ValueError(
                    f"Layer '{self.name}' expects `initial_state` as [y, c] of shapes "
                    f"{expected}. Received: shapes {shapes}"
                )
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if self.method == "sequential":
            return super().inner_loop(sequences, initial_state, mask, training=training)
        if mask is not None:
            mask = ops.cast(mask, "bool")
        if self.go_backwards:
            sequences = ops.flip(sequences, axis=1)
            mask = None if mask is None else ops.flip(mask, axis=1)
        # The previous output (B, O), then the states the cell's parallel form takes.
        previous, *states = initial_state
        outputs, states = self.cell.call_sequence(
            sequences,
            states,
            mask=mask,
            method=self.method,
            last_only=not self.return_sequences and mask is None,
            training=training,
        )  # (B, T or 1, O)
        if mask is None:
            last = outputs[:, -1]
        else:
            # keras.layers.RNN outputs, at a masked step, the output of the last real step (0
            # before the first real token of the call), or 0 with zero_output_for_mask. A cell's
            # output at a masked step need not equal that (a block's residual sees the masked
            # token's input), so carry the last real output forward. The state keeps the last
            # real output, or the incoming one if the call saw no real token.
            carried = _carry_last_real(outputs, mask)
            seen = ops.any(mask, axis=1)[:, None]  # (B, 1)
            last = ops.where(seen, carried[:, -1], ops.cast(previous, carried.dtype))
            if self.zero_output_for_mask:
                outputs = ops.where(mask[..., None], outputs, ops.zeros_like(outputs))
            else:
                outputs = carried
        return outputs[:, -1], outputs, [ops.cast(last, previous.dtype), *states]

    @property
    def variables(self):
        # keras.layers.RNN keeps `stateful` states in untracked variables. Compiled stateless
        # calls (JAX's predict, fit and evaluate) carry only `variables`, so without this a
        # second predict_on_batch would restart the stream. Listing them here, and not among the
        # weights, keeps them out of get_weights, set_weights and weight files, as for Keras'
        # own RNNs: a stateless and a stateful copy still share weights.
        variables = super().variables
        if self.stateful and self.states is not None:
            known = {id(v) for v in variables}
            variables += [v for v in self.states if id(v) not in known]
        return variables

    def get_config(self):
        config = super().get_config()
        del config["cell"]
        return {**config, **self.cell.arg_config(), "method": self.method}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
