"""The Keras plumbing shared by the layers: input checks, the arguments every attention cell
takes, and a `keras.layers.RNN` whose cell can also compute a whole sequence at once.

Shape letters used in this module: B batch, T timesteps, F input features, O output features.
"""

import contextlib
import contextvars
import typing
import weakref

import keras
from keras import ops

from keras_aaren.compat import output_before_first_real_step
from keras_aaren.distribution import current_sequence_sharding
from keras_aaren.ops import backend as plumbing
from keras_aaren.ops.chunked import DEFAULT_CHUNK_SIZE
from keras_aaren.ops.recurrence import SPREADS
from keras_aaren.ops.scan import check_method
from keras_aaren.ops.segments import carry_last_real, segment_starts
from keras_aaren.validation import (
    check_bool,
    check_positive_int,
    check_segment_ids,
    check_shape,
)


def token_matmul(x, kernel, keep_time_axis=False):
    """`(..., F) @ (F, K)` for every token, as a 2-D product over the flattened tokens.

    TensorFlow differentiates a 3-D-by-2-D matmul with a batched kernel gradient, slower than
    the plain product of the flattened tokens. When the time axis is split across devices
    (`keep_time_axis`), the flattened axis could not keep that split (time is its minor part),
    and XLA would gather every token onto every device; there the product keeps the sequence's
    axes.
    """
    if len(x.shape) <= 2 or keep_time_axis:
        return plumbing.matmul(x, kernel)
    lead = tuple(ops.shape(x)[:-1])
    flat = plumbing.matmul(ops.reshape(x, (-1, x.shape[-1])), kernel)
    return ops.reshape(flat, lead + (kernel.shape[-1],))


_TOKEN_SPREAD = contextvars.ContextVar("keras_aaren_token_spread", default="broadcast")


@contextlib.contextmanager
def token_spread(spread):
    """Within this context, the attention cells' one-token steps (traced or run) spread their
    per-head scales over the value columns as `spread` says (`ops.recurrence.aaren_step_flat`).

    `"broadcast"` outside it. The exports of the step choose `"product"` where the graph's
    matrix products stay in floating point; a scope rather than an argument, so that it reaches
    the cells of every recurrent layer, however they are nested, and no other layer.
    """
    if spread not in SPREADS:
        raise ValueError(f"`spread` must be one of {SPREADS}. Received: spread={spread!r}")
    token = _TOKEN_SPREAD.set(spread)
    try:
        yield
    finally:
        _TOKEN_SPREAD.reset(token)


def current_token_spread():
    """The spread of `token_spread`'s innermost context, `"broadcast"` outside any."""
    return _TOKEN_SPREAD.get()


def check_float(layer, inputs):
    """Raise a ValueError unless `inputs` is floating-point."""
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if "float" not in dtype:
        raise ValueError(
            f"Layer '{layer.name}' expects floating-point `inputs`; cast or embed integer data "
            f"first (e.g. with keras.layers.Embedding). Received: inputs.dtype={dtype}"
        )


def check_token_shape(layer, input_shape):
    """Raise a ValueError unless `input_shape` is one token, `(batch_size, features)`."""
    if len(input_shape) != 2 or input_shape[-1] is None:
        raise ValueError(
            f"Layer '{layer.name}' expects one token of shape (batch_size, features) with a "
            f"known `features`. Received: input_shape={tuple(input_shape)}"
        )


class AttentionCell(keras.layers.Layer):
    """The arguments, config and state size the cells share.

    `AarenCell` and `AarenBlockCell` take, after their own arguments, the projection arguments
    stored here (`ATTENTION_ARGUMENTS`, documented in their docstrings). `value_dim=None` means
    `key_dim`; `input_dim` is known once the cell is built.
    """

    #: The constructor arguments of every attention cell, stored and serialized by this class.
    ATTENTION_ARGUMENTS = (
        "num_heads",
        "key_dim",
        "value_dim",
        "use_bias",
        "kernel_initializer",
        "bias_initializer",
        "query_initializer",
        "kernel_regularizer",
        "bias_regularizer",
        "query_regularizer",
        "kernel_constraint",
        "bias_constraint",
        "query_constraint",
    )

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        query_initializer=None,
        kernel_regularizer=None,
        bias_regularizer=None,
        query_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        query_constraint=None,
        **kwargs,
    ):
        check_positive_int("num_heads", num_heads)
        check_positive_int("key_dim", key_dim)
        check_positive_int("value_dim", value_dim, allow_none=True)
        check_bool("use_bias", use_bias)
        if query_initializer is None:
            # Queries of the scale MultiHeadAttention computes from normalized inputs.
            query_initializer = keras.initializers.RandomNormal(stddev=1.0)
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = key_dim if value_dim is None else value_dim
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.query_initializer = keras.initializers.get(query_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.query_regularizer = keras.regularizers.get(query_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.query_constraint = keras.constraints.get(query_constraint)
        self.input_dim = None
        # Set by `ParallelRNN` while keras.layers.RNN's constructor reads `state_size` (see
        # `keras_aaren.compat`).
        self.width_pending = False

    @property
    def state_size(self):
        # The previous output, then the attention's (m, u, w) in one tensor.
        heads = self.num_heads
        return [self.previous_output_size(), 2 * heads + heads * self.value_dim]

    def previous_output_size(self):
        """The size of the first state, the previous output; see `unknown_width_message`."""
        if self.output_size is not None:
            return self.output_size
        if self.width_pending:
            return None
        raise ValueError(self.unknown_width_message())

    def unknown_width_message(self):
        """Why the state size is unknown, and what to pass (overridden per cell)."""
        raise NotImplementedError

    def get_config(self):
        config = {
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "query_initializer": keras.initializers.serialize(self.query_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "query_regularizer": keras.regularizers.serialize(self.query_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "query_constraint": keras.constraints.serialize(self.query_constraint),
        }
        return {**super().get_config(), **config}


def _check_sequences_shape(layer, shape):
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            f"Layer '{layer.name}' expects `sequences` of shape "
            "(batch_size, timesteps, features) with a known `features`. "
            f"Received: sequences.shape={tuple(shape)}"
        )
    # keras.layers.LSTM fails on an empty sequence with an opaque strided-slice error.
    if shape[1] == 0:
        raise ValueError(
            f"Layer '{layer.name}' expects `sequences` with at least one timestep (axis 1, "
            f"`timesteps`). Received: sequences.shape={tuple(shape)}"
        )


def learn_width(cell, sequences_shape):
    """Set an unbuilt cell's `input_dim` from a sequence shape, where the shape knows it."""
    if cell.input_dim is None and len(sequences_shape) == 3 and sequences_shape[-1] is not None:
        cell.input_dim = int(sequences_shape[-1])


class SequenceOptions(typing.NamedTuple):
    """What a sequence layer's call passes down to its cell besides tensors: everything that
    changes the computation, so that none of it is read from the layer while it runs."""

    method: str
    go_backwards: bool
    zero_output_for_mask: bool
    return_sequences: bool
    # A `keras_aaren.ops.SequenceSharding` when the time axis is split across devices.
    sharding: object = None


def run_sequence(cell, sequences, states, mask, training, segment_ids, options):
    """A sequence through a cell's parallel form, as `keras.layers.RNN` returns it.

    Args:
        cell: the cell, with `call_sequence`.
        sequences: (B, T, F).
        states: the incoming states `[y, c]`: the previous output (B, O), then the cell's state.
        mask: (B, T) bool or None.
        training: bool.
        segment_ids: (B, T) int or None.
        options: `SequenceOptions`.

    Returns:
        `(last_output, outputs, new_states)` as `keras.layers.RNN`'s step loop returns them:
        outputs (B, T, O), reversed with `go_backwards`, and the outgoing `[y, c]`.
    """
    if mask is not None:
        mask = ops.cast(mask, "bool")
    if options.go_backwards:
        sequences = ops.flip(sequences, axis=1)
        mask = None if mask is None else ops.flip(mask, axis=1)
        segment_ids = None if segment_ids is None else ops.flip(segment_ids, axis=1)
    previous, *states = states
    outputs, states = cell.call_sequence(
        sequences,
        states,
        mask=mask,
        method=options.method,
        last_only=not options.return_sequences and mask is None,
        training=training,
        segment_ids=segment_ids,
        sharding=options.sharding,
    )  # (B, T or 1, O)
    if mask is None:
        last = outputs[:, -1]
    else:
        # keras.layers.RNN outputs, at a masked step, the output of the last real step
        # (before the first real token of the call, what its backend's loop outputs there),
        # or 0 with zero_output_for_mask. A cell's output at a masked step need not equal
        # that (a block's residual sees the masked token's input), so carry the last real
        # output forward. The state keeps the last real output, or the incoming one if the
        # call saw no real token; with segments, the same within each segment.
        before = output_before_first_real_step(previous)
        starts = None if segment_ids is None else segment_starts(segment_ids)
        carried, seen, first = carry_last_real(outputs, mask, before, starts)
        incoming = ops.where(
            first[:, -1:], ops.cast(previous, carried.dtype), ops.zeros_like(carried[:, -1])
        )
        last = ops.where(seen[:, -1:], carried[:, -1], incoming)
        if options.zero_output_for_mask:
            outputs = ops.where(mask[..., None], outputs, ops.zeros_like(outputs))
        else:
            outputs = carried
    return outputs[:, -1], outputs, [ops.cast(last, previous.dtype), *states]


def _eager_program(cell_ref, options):
    """`run_sequence` of a cell as one JAX program, with the cell's weights as arguments.

    The program reaches the cell through a weak reference, so that a kept program does not keep
    its layer alive; the layer drops its programs when it goes (`ParallelRNN.__init__`).
    """
    import jax

    def run(values, sequences, states, mask, segment_ids):
        cell = cell_ref()
        mapping = list(zip(cell.variables, values))
        with keras.StatelessScope(state_mapping=mapping):
            return run_sequence(cell, sequences, states, mask, False, segment_ids, options)

    return jax.jit(run)


class ParallelRNN(keras.layers.RNN):
    """A `keras.layers.RNN` that computes the whole sequence with its cell's parallel form.

    The cell implements the usual one-token `call(inputs, states)`, whose first state is the
    previous output (Keras' convention: its JAX loop outputs that state at a masked timestep),
    and also `call_sequence(sequences, states, mask, method, last_only, training, segment_ids,
    sharding)`, which takes the other states and returns the outputs of every timestep (or of
    the last one) and the final other states in one pass. This class's `call` runs that, seeded
    by the incoming state, tracks the previous output itself, and keeps everything else of
    `keras.layers.RNN`: `return_sequences`, `return_state`, `initial_state`, `stateful`,
    `go_backwards`, `zero_output_for_mask` and masking mean what they mean there.
    `method="sequential"` without `segment_ids` runs `keras.layers.RNN`'s own call, its step
    loop over the cell.

    Everything a call needs travels as arguments (`run_sequence`): nothing of a call is kept on
    the layer, so one layer can serve several threads at once.

    Args:
        cell: an `AttentionCell`, with `call`, `call_sequence`, `state_size` and
            `output_size`; its `state_size` may depend on the input width, and is read again
            after `build`.
        method: passed to the cell's `call_sequence`; `"sequential"` steps the cell.
        **kwargs: the arguments of `keras.layers.RNN`.
    """

    def __init__(self, cell, method="auto", **kwargs):
        check_method(method)
        # keras.layers.RNN copies the cell's state sizes here, before the input tells the cell
        # its width; this layer reads them again once it knows (`build`,
        # `compute_output_shape`), so the cell may leave that size open meanwhile.
        cell.width_pending = True
        try:
            super().__init__(cell, **kwargs)
        finally:
            cell.width_pending = False
        self.method = method
        self.supports_masking = True
        # The key of this layer's programs for eager calls on JAX: a token, not the layer, so
        # that a kept program keeps no layer alive, and a later layer at the same address
        # never finds this one's programs. They are dropped when the layer is collected.
        self._program_owner = object()
        weakref.finalize(self, plumbing.EAGER_PROGRAMS.drop, self._program_owner)

    # The arguments of the attention cell, as `keras.layers.LSTM` shows those of its cell.
    @property
    def num_heads(self):
        return self.cell.num_heads

    @property
    def key_dim(self):
        return self.cell.key_dim

    @property
    def value_dim(self):
        return self.cell.value_dim

    @property
    def use_bias(self):
        return self.cell.use_bias

    @property
    def kernel_initializer(self):
        return self.cell.kernel_initializer

    @property
    def bias_initializer(self):
        return self.cell.bias_initializer

    @property
    def query_initializer(self):
        return self.cell.query_initializer

    @property
    def kernel_regularizer(self):
        return self.cell.kernel_regularizer

    @property
    def bias_regularizer(self):
        return self.cell.bias_regularizer

    @property
    def query_regularizer(self):
        return self.cell.query_regularizer

    @property
    def kernel_constraint(self):
        return self.cell.kernel_constraint

    @property
    def bias_constraint(self):
        return self.cell.bias_constraint

    @property
    def query_constraint(self):
        return self.cell.query_constraint

    def build(self, sequences_shape, initial_state_shape=None, segment_ids_shape=None):
        _check_sequences_shape(self, sequences_shape)
        super().build(sequences_shape, initial_state_shape)
        # keras.layers.RNN copied the cell's state sizes when constructed; the previous output's
        # size is known only once the cell is built.
        self.state_size = list(self.cell.state_size)

    def call(self, sequences, initial_state=None, mask=None, training=False, segment_ids=None):
        self._check_call(sequences, initial_state, mask, segment_ids)
        if self.method == "sequential" and segment_ids is None:
            return super().call(
                sequences, initial_state=initial_state, mask=mask, training=training
            )
        states = self._incoming_states(sequences, initial_state)
        options = SequenceOptions(
            self.method,
            self.go_backwards,
            self.zero_output_for_mask,
            self.return_sequences,
            current_sequence_sharding(),
        )
        if not training and plumbing.runs_eagerly_on_jax(sequences, states, mask, segment_ids):
            last, outputs, states = self._eager_sequence(
                sequences, states, mask, segment_ids, options
            )
        else:
            last, outputs, states = run_sequence(
                self.cell, sequences, states, mask, training, segment_ids, options
            )
        dtype = self.compute_dtype
        states = [ops.cast(s, dtype) for s in states]
        if self.stateful:
            for variable, state in zip(self.states, states):
                variable.assign(state)
        output = ops.cast(outputs if self.return_sequences else last, dtype)
        if self.return_state:
            return output, *states
        return output

    def _check_call(self, sequences, initial_state, mask, segment_ids):
        check_float(self, sequences)
        _check_sequences_shape(self, sequences.shape)
        batch, steps = sequences.shape[0], sequences.shape[1]
        if mask is not None:
            check_shape("mask", mask.shape, (batch, steps), "(batch_size, timesteps)")
        if segment_ids is not None:
            dtype = keras.backend.standardize_dtype(segment_ids.dtype)
            check_segment_ids(segment_ids.shape, dtype, (batch, steps))
        if initial_state is not None:
            states = initial_state if isinstance(initial_state, (list, tuple)) else [initial_state]
            expected = [(batch, size) for size in self.cell.state_size]
            if len(states) != len(expected):
                raise ValueError(
                    f"Layer '{self.name}' expects `initial_state` as [y, c] of shapes "
                    f"{expected}. Received: {len(states)} tensors"
                )
            for name, state, shape in zip(("y", "c"), states, expected):
                check_shape(f"initial_state.{name}", state.shape, shape, "(batch_size, size)")

    def _incoming_states(self, sequences, initial_state):
        """The states a call starts from, in the cell's compute dtype, as `keras.layers.RNN`
        takes them: the given ones, else a stateful layer's, else zeros."""
        if initial_state is None:
            if self.stateful:
                initial_state = self.states
            else:
                initial_state = self.get_initial_state(ops.shape(sequences)[0])
        elif not isinstance(initial_state, (list, tuple)):
            initial_state = [initial_state]
        if self.stateful and self.states is not None:
            expected, received = self.states[0].shape[0], sequences.shape[0]
            if received is not None and received != expected:
                raise ValueError(
                    f"Layer '{self.name}' is stateful with a batch size of {expected}: its "
                    f"`sequences` must have that batch size. Received: sequences.shape="
                    f"{tuple(sequences.shape)}"
                )
        dtype = self.cell.compute_dtype
        return [ops.convert_to_tensor(state, dtype=dtype) for state in initial_state]

    def _eager_sequence(self, sequences, states, mask, segment_ids, options):
        """`run_sequence` of an eager call on JAX, as one program per length bucket.

        Op by op, every new length compiles each of the layer's primitives again and JAX keeps
        them all, so a process that calls a layer eagerly on many lengths would grow without
        bound. Here the sequence is padded up to its bucket (`ops.backend.padded_length`) with
        masked tokens (in front when the layer runs backwards, so that they come last), and the
        layer's math runs as one compiled program, of which a bounded number is kept
        (`keras_aaren.ops.set_program_limit`). The weights enter as arguments, so the
        program follows them as they change.
        """
        steps = sequences.shape[1]
        (sequences,), mask, segment_ids = plumbing.pad_to_bucket(
            (sequences,), mask, segment_ids, DEFAULT_CHUNK_SIZE, front=options.go_backwards
        )
        shapes = plumbing.signature(sequences, segment_ids, *states)
        key = (self._program_owner, options, self.cell.compute_dtype, shapes)
        cell = weakref.ref(self.cell)
        program = plumbing.EAGER_PROGRAMS.get(key, lambda: _eager_program(cell, options))
        values = [v.value for v in self.cell.variables]
        _, outputs, states = program(values, sequences, states, mask, segment_ids)
        # With go_backwards the padding came first, and so it ends the flipped outputs.
        outputs = outputs[:, :steps]
        return outputs[:, -1], outputs, states

    def compute_output_shape(
        self, sequences_shape, initial_state_shape=None, segment_ids_shape=None
    ):
        # Answers from the input shape before the cell is built, as keras.layers.LSTM does.
        learn_width(self.cell, sequences_shape)
        batch, steps = sequences_shape[0], sequences_shape[1]
        size = self.cell.output_size
        output_shape = (batch, steps, size) if self.return_sequences else (batch, size)
        if self.return_state:
            return output_shape, *((batch, n) for n in self.cell.state_size)
        return output_shape

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
        # The layer builds its own cell: its config holds the cell's arguments, not the cell.
        config = super().get_config()
        del config["cell"]
        cell = self.cell.get_config()
        arguments = {name: cell[name] for name in AttentionCell.ATTENTION_ARGUMENTS}
        return {**config, **arguments, "method": self.method}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
