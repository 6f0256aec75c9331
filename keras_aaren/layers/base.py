"""The Keras plumbing shared by the layers: input checks, and a `keras.layers.RNN` whose cell can
also compute a whole sequence at once.

Shape letters used in this module: B batch, T timesteps, F input features, O output features.
"""

import keras
from keras import ops

from keras_aaren.compat import output_before_first_real_step
from keras_aaren.layers.arguments import resolve, serialize
from keras_aaren.ops import backend as plumbing
from keras_aaren.ops import context_parallel
from keras_aaren.ops.chunked import DEFAULT_CHUNK_SIZE
from keras_aaren.ops.scan import check_method, segment_starts
from keras_aaren.validation import check_positive_int, check_shape


def splits_time():
    """Whether the sequences being traced are split along time across devices: a
    `keras_aaren.distribution.ContextParallel` with more than one sequence shard, on JAX."""
    return context_parallel.active_distribution() is not None


def token_matmul(x, kernel):
    """`(..., F) @ (F, K)` for every token, as a 2-D product over the flattened tokens.

    TensorFlow differentiates a 3-D-by-2-D matmul with a batched kernel gradient, slower than
    the plain product of the flattened tokens. When `ContextParallel` splits time across
    devices, the flattened axis cannot keep that split (time is its minor part), and XLA would
    gather every token onto every device; there the product keeps the sequence's axes.
    """
    if len(x.shape) <= 2 or splits_time():
        return ops.matmul(x, kernel)
    lead = tuple(ops.shape(x)[:-1])
    flat = ops.matmul(ops.reshape(x, (-1, x.shape[-1])), kernel)
    return ops.reshape(flat, lead + (kernel.shape[-1],))


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
    """The constructor, config and state size the cells share.

    A subclass lists its arguments after `num_heads` and `key_dim` in `arguments` (a tuple of
    `arguments.Argument`) and passes the values it received as a dict; they are checked, stored
    as attributes (identifiers deserialized) and serialized by `get_config` from that one list.
    `value_dim=None` means `key_dim`; `input_dim` is known once the cell is built.
    """

    arguments = ()

    def __init__(self, num_heads, key_dim, values, **kwargs):
        check_positive_int("num_heads", num_heads)
        check_positive_int("key_dim", key_dim)
        values = resolve(self.arguments, values)
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        for name, value in values.items():
            setattr(self, name, value)
        if self.value_dim is None:
            self.value_dim = key_dim
        self.input_dim = None
        # Set by `ParallelRNN` while keras.layers.RNN's constructor reads `state_size`.
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
        config = {"num_heads": self.num_heads, "key_dim": self.key_dim}
        return {**super().get_config(), **config, **serialize(self.arguments, self)}


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


def _in_order(flags):
    """(B, T) bool -> (B, T) int: the positions where `flags` holds, in order, then the rest.

    Sorting flagged positions before the others (keys are unique) lists them in order: the c-th
    flagged position is entry c - 1. A sort and a gather, so it compiles under XLA like the scan.
    """
    steps = ops.shape(flags)[1]
    position = ops.arange(steps)
    return ops.argsort(ops.where(flags, position, position + steps), axis=1)


def _carry_last_real(outputs, mask, before, starts=None):
    """Each step's output replaced by that of the last real step of its segment up to it.

    Before its segment's first real step, a step outputs `before` in the first segment and zeros
    in the others, as each segment would alone.

    Args:
        outputs: (B, T, O).
        mask: (B, T) bool.
        before: (B, O).
        starts: optional (B, T) bool, True at a segment's first token.

    Returns:
        A tuple `(carried, seen, first)`: the outputs (B, T, O), whether each step's segment
        has seen a real token up to it (B, T), and whether it is the first segment (B, T).
    """
    count = ops.cumsum(ops.cast(mask, "int32"), axis=1)  # (B, T) real steps up to each
    source = ops.take_along_axis(_in_order(mask), ops.maximum(count - 1, 0), axis=1)
    index = ops.repeat(source[..., None], outputs.shape[-1], axis=-1)  # (B, T, O)
    carried = ops.take_along_axis(outputs, index, axis=1)
    if starts is None:
        seen, first = count > 0, ops.ones_like(mask)
    else:
        # Real steps before a step's segment: the count just before the segment's first token.
        segment = ops.cumsum(ops.cast(starts, "int32"), axis=1)  # (B, T) starts up to each
        start = ops.take_along_axis(_in_order(starts), ops.maximum(segment - 1, 0), axis=1)
        before_segment = ops.take_along_axis(count - ops.cast(mask, "int32"), start, axis=1)
        first = segment == 0
        seen = count > ops.where(first, 0, before_segment)
    otherwise = ops.where(
        first[..., None], ops.cast(before, carried.dtype)[:, None], ops.zeros_like(carried)
    )
    return ops.where(seen[..., None], carried, otherwise), seen, first


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
        self._segment_ids = None

    def build(self, sequences_shape, initial_state_shape=None, segment_ids_shape=None):
        _check_sequences_shape(self, sequences_shape)
        super().build(sequences_shape, initial_state_shape)
        # keras.layers.RNN copies the cell's state sizes when constructed; the previous output's
        # size is known only once the cell is built.
        self.state_size = list(self.cell.state_size)

    def call(self, sequences, initial_state=None, mask=None, training=False, segment_ids=None):
        check_float(self, sequences)
        _check_sequences_shape(self, sequences.shape)
        batch, steps = sequences.shape[0], sequences.shape[1]
        if mask is not None:
            check_shape("mask", mask.shape, (batch, steps), "(batch_size, timesteps)")
        if segment_ids is not None:
            check_shape("segment_ids", segment_ids.shape, (batch, steps), "(batch_size, timesteps)")
            dtype = keras.backend.standardize_dtype(segment_ids.dtype)
            if "int" not in dtype:
                raise ValueError(
                    f"Layer '{self.name}' expects integer `segment_ids`, one segment id per "
                    f"token. Received: segment_ids.dtype={dtype}"
                )
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
        # keras.layers.RNN.call hands `inner_loop` the sequences, state, mask and training only;
        # the segment ids of this call wait here for it.
        self._segment_ids = segment_ids
        try:
            return super().call(
                sequences, initial_state=initial_state, mask=mask, training=training
            )
        finally:
            self._segment_ids = None

    def compute_output_shape(
        self, sequences_shape, initial_state_shape=None, segment_ids_shape=None
    ):
        # Answers from the input shape before the cell is built, as keras.layers.LSTM does.
        learn_width(self.cell, sequences_shape)
        self.state_size = list(self.cell.state_size)
        return super().compute_output_shape(sequences_shape, initial_state_shape)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        segment_ids = self._segment_ids
        if not training and plumbing.runs_eagerly_on_jax(
            sequences, initial_state, mask, segment_ids
        ):
            return self._eager_inner_loop(sequences, initial_state, mask, segment_ids)
        return self._inner_loop(sequences, initial_state, mask, training, segment_ids)

    def _eager_inner_loop(self, sequences, initial_state, mask, segment_ids):
        """`_inner_loop` of an eager call on JAX, as one program per length bucket.

        Op by op, every new length compiles each of the layer's primitives again and JAX keeps
        them all, so a process that calls a layer eagerly on many lengths would grow without
        bound. Here the sequence is padded up to its bucket (`ops.backend.padded_length`) with
        masked tokens (in front when the layer runs backwards, so that they come last), and the
        layer's math runs as one compiled program, of which a bounded number is kept
        (`keras_aaren.ops.set_eager_program_limit`). The weights enter as arguments, so the
        program follows them as they change.
        """
        steps = sequences.shape[1]
        (sequences,), mask, segment_ids = plumbing.pad_to_bucket(
            (sequences,), mask, segment_ids, DEFAULT_CHUNK_SIZE, front=self.go_backwards
        )
        variables = list(self.cell.variables)

        def run(values, sequences, initial_state, mask, segment_ids):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return self._inner_loop(sequences, initial_state, mask, False, segment_ids)

        signature = tuple(
            None if x is None else (tuple(x.shape), keras.backend.standardize_dtype(x.dtype))
            for x in (sequences, segment_ids, *initial_state)
        )
        program = plumbing.eager_program(run, (id(self), signature))
        values = [v.value for v in variables]
        _, outputs, states = program(values, sequences, initial_state, mask, segment_ids)
        # With go_backwards the padding came first, and so it ends the flipped outputs.
        outputs = outputs[:, :steps]
        return outputs[:, -1], outputs, states

    def _inner_loop(self, sequences, initial_state, mask, training, segment_ids=None):
        # keras.layers.RNN's step loop knows no segments; with them, the cell's parallel form
        # runs its own sequential scan.
        if self.method == "sequential" and segment_ids is None:
            return super().inner_loop(sequences, initial_state, mask, training=training)
        if mask is not None:
            mask = ops.cast(mask, "bool")
        if self.go_backwards:
            sequences = ops.flip(sequences, axis=1)
            mask = None if mask is None else ops.flip(mask, axis=1)
            segment_ids = None if segment_ids is None else ops.flip(segment_ids, axis=1)
        # The previous output (B, O), then the states the cell's parallel form takes.
        previous, *states = initial_state
        outputs, states = self.cell.call_sequence(
            sequences,
            states,
            mask=mask,
            method=self.method,
            last_only=not self.return_sequences and mask is None,
            training=training,
            segment_ids=segment_ids,
        )  # (B, T or 1, O)
        if mask is None:
            last = outputs[:, -1]
        else:
            # keras.layers.RNN outputs, at a masked step, the output of the last real step
            # (before the first real token of the call, what its backend's loop outputs there),
            # or 0 with zero_output_for_mask. A cell's output at a masked step need not equal
            # that (a block's residual sees the masked token's input), so carry the last real
            # output forward. The state keeps the last real output, or the incoming one if the
            # call saw no real token.
            # With segments, the same within each segment, which starts from nothing seen.
            before = output_before_first_real_step(previous)
            starts = None if segment_ids is None else segment_starts(segment_ids)
            carried, seen, first = _carry_last_real(outputs, mask, before, starts)
            incoming = ops.where(
                first[:, -1:], ops.cast(previous, carried.dtype), ops.zeros_like(carried[:, -1])
            )
            last = ops.where(seen[:, -1:], carried[:, -1], incoming)
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
        # The layer builds its own cell: its config holds the cell's arguments, not the cell.
        config = super().get_config()
        del config["cell"]
        cell_config = self.cell.get_config()
        names = ("num_heads", "key_dim", *(a.name for a in self.cell.arguments))
        return {**config, **{name: cell_config[name] for name in names}, "method": self.method}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
