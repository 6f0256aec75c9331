"""Aaren in a Transformer encoder block: the block cell and the parallel block layer.

Shape letters used in this module: B batch, T timesteps, F model width (features).
"""

import keras
from keras import ops

from keras_aaren.layers.aaren import AarenCell
from keras_aaren.layers.arguments import (
    BLOCK,
    PROJECTION,
    RECURRENT,
    VALUE_DIM,
    takes,
)
from keras_aaren.layers.base import (
    AttentionCell,
    ParallelRNN,
    check_float,
    check_token_shape,
    follow_input_width,
    init_sequence_layer,
)

# The arguments of the block cell after `num_heads` and `key_dim`.
CELL_ARGUMENTS = (VALUE_DIM, BLOCK, PROJECTION)


def _dropout_rnn_cell():
    """Keras' mixin for cells whose dropout masks `keras.layers.RNN` draws before its loop.

    `keras.layers.RNN` draws the masks of a cell that derives from it once per call, outside its
    step loop, as `LSTMCell`'s are; a cell that drew them inside the loop would, on JAX, advance
    a seed generator inside `jax.lax.scan` and leak its tracer. Keras does not export the class,
    so it is taken from `LSTMCell`'s bases; without it the cell draws in the loop.
    """
    for base in keras.layers.LSTMCell.__mro__:
        if base.__name__ == "DropoutRNNCell":
            return base
    return object


DropoutRNNCell = _dropout_rnn_cell()


@keras.saving.register_keras_serializable(package="keras_aaren")
@takes(*CELL_ARGUMENTS)
class AarenBlockCell(DropoutRNNCell, AttentionCell):
    """Cell of a Transformer encoder block whose attention is Aaren (arXiv 2405.13956).

    The block runs one token at a time with the constant-size state of its `AarenCell`; every
    other part of the block (residuals, LayerNormalization, feed-forward network, dropout) acts
    on each token alone, so a stack of blocks streams exactly like one Aaren layer. Wrap it in
    `keras.layers.RNN`, or use `layer.cell` of a trained `AarenBlock`. Its first state is its
    previous output, of the input's width: `keras.layers.RNN` reads the state sizes when it is
    constructed, so with `return_state=True` on a symbolic input, build the cell first.

    Post-norm (the default, as in the original Transformer encoder):

    $$h = \\operatorname{LN}_1(x + \\operatorname{Aaren}(x)), \\qquad
    y = \\operatorname{LN}_2(h + \\operatorname{FFN}(h))$$

    pre-norm (`norm_first=True`):

    $$h = x + \\operatorname{Aaren}(\\operatorname{LN}_1(x)), \\qquad
    y = h + \\operatorname{FFN}(\\operatorname{LN}_2(h))$$

    with $\\operatorname{FFN}(h) = \\sigma(h W_1 + b_1) W_2 + b_2$ and dropout on the outputs of
    Aaren and of the FFN. Code names: `attention` (the `AarenCell`), `attention_norm`
    ($\\operatorname{LN}_1$), `ffn_norm` ($\\operatorname{LN}_2$), `ffn_intermediate` ($W_1$),
    `ffn_output` ($W_2$).

    Args:
        num_heads: int, number of Aaren heads.
        key_dim: int, size of each head's query and key (as in `MultiHeadAttention`).
        {arguments}
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: tensor of shape `(batch_size, width)`, one token.
        states: list `[y, c]`: the block's previous output, then the state of the Aaren
            attention, the paper's $(m, u, w)$ in one tensor (see `AarenCell`).
        training: bool, whether dropout is active.

    Returns:
        A tuple `(output, new_states)`, `output` of shape `(batch_size, width)` and the new
        states `[output, c]`.

    Raises:
        ValueError: if `num_heads`, `key_dim`, `value_dim` or `ffn_dim` is not a positive
            integer, `dropout` is not in [0, 1), or the input is not `(batch_size, width)`.

    Examples:
        >>> import numpy as np
        >>> import keras
        >>> cell = AarenBlockCell(num_heads=2, key_dim=8, ffn_dim=32)
        >>> y = keras.layers.RNN(cell, return_sequences=True)(np.random.rand(3, 7, 16))
        >>> tuple(y.shape)
        (3, 7, 16)
    """

    def __init__(self, num_heads, key_dim, **kwargs):
        super().__init__(num_heads, key_dim, **kwargs)
        self.attention = None
        # The step form's dropout masks (see `DropoutRNNCell`): one for the attention's output
        # and one for the feed-forward network's, drawn once per call of `keras.layers.RNN`.
        self.recurrent_dropout = 0.0
        self.dropout_mask_count = 2
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    @property
    def output_size(self):
        return self.input_dim

    @property
    def state_size(self):
        # The block's previous output, then the attention's (m, u, w) in one tensor.
        if self.input_dim is None:
            follow_input_width(self)
        heads = self.num_heads
        return [self.input_dim, 2 * heads + heads * self.value_dim]

    def build(self, input_shape):
        check_token_shape(self, input_shape)
        width = int(input_shape[-1])
        self.input_dim = width
        # The attention takes every projection argument; the dense layers those they have.
        projection = {a.name: getattr(self, a.name) for a in PROJECTION}
        dense = {name: value for name, value in projection.items() if not name.startswith("query_")}
        policy = dict(dtype=self.dtype_policy)
        self.attention = AarenCell(
            self.num_heads,
            self.key_dim,
            value_dim=self.value_dim,
            output_dim=width,
            name="attention",
            **projection,
            **policy,
        )
        self.ffn_intermediate = keras.layers.Dense(
            self.ffn_dim or 4 * width,
            activation=self.activation,
            name="ffn_intermediate",
            **dense,
            **policy,
        )
        self.ffn_output = keras.layers.Dense(width, name="ffn_output", **dense, **policy)
        norm = dict(epsilon=self.layer_norm_epsilon, **policy)
        self.attention_norm = keras.layers.LayerNormalization(name="attention_norm", **norm)
        self.ffn_norm = keras.layers.LayerNormalization(name="ffn_norm", **norm)
        seeds = (None, None) if self.seed is None else (self.seed, self.seed + 1)
        self.attention_dropout = keras.layers.Dropout(self.dropout, seed=seeds[0], **policy)
        self.ffn_dropout = keras.layers.Dropout(self.dropout, seed=seeds[1], **policy)

        token_shape = tuple(input_shape)
        self.attention.build(token_shape)
        self.attention_norm.build(token_shape)
        self.ffn_norm.build(token_shape)
        self.ffn_intermediate.build(token_shape)
        self.ffn_output.build(token_shape[:-1] + (self.ffn_intermediate.units,))
        self.built = True

    def _attention_input(self, x):
        return self.attention_norm(x) if self.norm_first else x

    def _rest_of_block(self, x, attended, dropout_attended, dropout_ffn):
        # Everything after the attention acts on each token alone.
        h = x + dropout_attended(attended)
        if not self.norm_first:
            h = self.attention_norm(h)
        ffn_input = self.ffn_norm(h) if self.norm_first else h
        ffn = self.ffn_output(self.ffn_intermediate(ffn_input))
        y = h + dropout_ffn(ffn)
        return y if self.norm_first else self.ffn_norm(y)

    def call(self, inputs, states, training=False):
        check_float(self, inputs)
        attended, new_states = self.attention.call_token(self._attention_input(inputs), states[1:])
        if training and self.dropout > 0 and hasattr(self, "get_dropout_mask"):
            # The same masks at every step of one call of keras.layers.RNN, as LSTMCell's.
            masks = self.get_dropout_mask(inputs)
            drop = [lambda t, mask=mask: t * ops.cast(mask, t.dtype) for mask in masks]
        else:
            drop = [
                lambda t: self.attention_dropout(t, training=training),
                lambda t: self.ffn_dropout(t, training=training),
            ]
        outputs = self._rest_of_block(inputs, attended, *drop)
        return outputs, [ops.cast(outputs, states[0].dtype), *new_states]

    def call_sequence(
        self, sequences, states, mask=None, method="auto", last_only=False, training=False
    ):
        """The parallel form of the block over `(batch_size, timesteps, width)`, with the
        attention's state `[c]`; see `AarenCell.call_sequence`."""
        attended, new_states = self.attention.call_sequence(
            self._attention_input(sequences),
            states,
            mask=mask,
            method=method,
            last_only=last_only,
        )
        if last_only:
            sequences = sequences[:, -1:]
        outputs = self._rest_of_block(
            sequences,
            attended,
            lambda t: self.attention_dropout(t, training=training),
            lambda t: self.ffn_dropout(t, training=training),
        )
        return outputs, new_states

    def get_initial_state(self, batch_size=None):
        # The attention's output has the block's width, so its states have the block's sizes.
        return self.attention.get_initial_state(batch_size)


@keras.saving.register_keras_serializable(package="keras_aaren")
@takes(
    *CELL_ARGUMENTS,
    RECURRENT,
    defaults={"return_sequences": True},
    cell_arguments=AarenBlockCell.arguments,
)
class AarenBlock(ParallelRNN):
    """Transformer encoder block with Aaren as its attention (Feng et al., arXiv 2405.13956).

    Use it where you would stack Transformer encoder blocks over a sequence: it trains in
    parallel over the whole sequence, and because its attention is Aaren (a learned query,
    computed as a prefix scan) it is causal and serves one token at a time in constant memory.
    Its parameter count is that of a Transformer encoder block of the same width
    (`MultiHeadAttention`, two `LayerNormalization`, a two-layer feed-forward network) plus the
    learned query token. The block's weights are those of its `AarenBlockCell`:
    `keras.layers.RNN(block.cell)` runs them token by token.

    Post-norm by default, pre-norm with `norm_first=True` (equations in `AarenBlockCell`):

    $$y = \\operatorname{LN}_2(h + \\operatorname{FFN}(h)), \\qquad
    h = \\operatorname{LN}_1(x + \\operatorname{Aaren}(x))$$

    Args:
        num_heads: int, number of Aaren heads.
        key_dim: int, size of each head's query and key (as in `MultiHeadAttention`).
        {arguments}
        **kwargs: base layer keyword arguments.

    Call arguments:
        sequences: tensor `(batch_size, timesteps, width)`.
        initial_state: optional list `[y, c]` (see `AarenBlockCell`), e.g. from a call
            with `return_state=True`.
        mask: optional boolean tensor `(batch_size, timesteps)`.
        training: bool, whether dropout is active.

    Returns:
        `(batch_size, timesteps, width)` (or `(batch_size, width)` without `return_sequences`),
        followed by the two final states with `return_state`.

    Raises:
        ValueError: as `AarenBlockCell`, plus an unknown `method`, a non-float or wrongly shaped
            input, or a `mask` or `initial_state` of the wrong shape.

    Examples:
        >>> import numpy as np
        >>> import keras
        >>> model = keras.Sequential([
        ...     keras.Input((None, 16)),
        ...     AarenBlock(num_heads=4, key_dim=4, ffn_dim=32),
        ...     AarenBlock(num_heads=4, key_dim=4, ffn_dim=32, norm_first=True),
        ... ])
        >>> tuple(model(np.random.rand(2, 9, 16)).shape)
        (2, 9, 16)
    """

    def __init__(self, num_heads, key_dim, **kwargs):
        init_sequence_layer(self, AarenBlockCell, num_heads, key_dim, kwargs, "aaren_block_cell")
