"""Aaren in a Transformer encoder block: the block cell and the parallel block layer.

Shape letters used in this module: B batch, T timesteps, F model width (features).
"""

import keras
from keras import ops

from keras_aaren.layers.aaren import AarenCell
from keras_aaren.layers.base import (
    ParallelRNN,
    cell_attribute,
    check_float,
    check_positive_int,
    check_token_shape,
)


@keras.saving.register_keras_serializable(package="keras_aaren")
class AarenBlockCell(keras.layers.Layer):
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
        value_dim: int, size of each head's value; defaults to `key_dim`.
        ffn_dim: int, width of the feed-forward network's hidden layer; defaults to `4 * width`.
        activation: activation of the feed-forward network's hidden layer.
        dropout: float in [0, 1), dropout rate after Aaren and after the feed-forward network.
        norm_first: bool, pre-norm (True) or post-norm (False) residual blocks.
        layer_norm_epsilon: float, epsilon of both LayerNormalization layers.
        use_bias: bool, whether the projections and dense layers use biases.
        kernel_initializer: initializer of all kernels.
        bias_initializer: initializer of all biases.
        query_initializer: initializer of the learned query token (see `AarenCell`).
        kernel_regularizer: regularizer of all kernels.
        bias_regularizer: regularizer of all biases.
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

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        ffn_dim=None,
        activation="relu",
        dropout=0.0,
        norm_first=False,
        layer_norm_epsilon=1e-5,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        query_initializer=None,
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        check_positive_int("num_heads", num_heads)
        check_positive_int("key_dim", key_dim)
        check_positive_int("value_dim", value_dim, allow_none=True)
        check_positive_int("ffn_dim", ffn_dim, allow_none=True)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}")
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim if value_dim is not None else key_dim
        self.ffn_dim = ffn_dim
        self.activation = keras.activations.get(activation)
        self.dropout = dropout
        self.norm_first = norm_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.query_initializer = (
            None if query_initializer is None else keras.initializers.get(query_initializer)
        )
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.input_dim = None
        self.attention = None

    @property
    def output_size(self):
        return self.input_dim

    @property
    def state_size(self):
        # The block's previous output, then the attention's (m, u, w) in one tensor.
        heads = self.num_heads
        return [self.input_dim, 2 * heads + heads * self.value_dim]

    def _sublayer_arguments(self):
        return dict(
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        check_token_shape(self, input_shape)
        width = int(input_shape[-1])
        self.input_dim = width
        self.attention = AarenCell(
            self.num_heads,
            self.key_dim,
            value_dim=self.value_dim,
            output_dim=width,
            query_initializer=self.query_initializer,
            name="attention",
            **self._sublayer_arguments(),
        )
        dense = self._sublayer_arguments()
        self.ffn_intermediate = keras.layers.Dense(
            self.ffn_dim or 4 * width,
            activation=self.activation,
            name="ffn_intermediate",
            **dense,
        )
        self.ffn_output = keras.layers.Dense(width, name="ffn_output", **dense)
        norm = dict(epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy)
        self.attention_norm = keras.layers.LayerNormalization(name="attention_norm", **norm)
        self.ffn_norm = keras.layers.LayerNormalization(name="ffn_norm", **norm)
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.ffn_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

        token_shape = tuple(input_shape)
        self.attention.build(token_shape)
        self.attention_norm.build(token_shape)
        self.ffn_norm.build(token_shape)
        self.ffn_intermediate.build(token_shape)
        self.ffn_output.build(token_shape[:-1] + (self.ffn_intermediate.units,))
        self.built = True

    def _attention_input(self, x):
        return self.attention_norm(x) if self.norm_first else x

    def _rest_of_block(self, x, attended, training):
        # Everything after the attention acts on each token alone.
        h = x + self.attention_dropout(attended, training=training)
        if not self.norm_first:
            h = self.attention_norm(h)
        ffn_input = self.ffn_norm(h) if self.norm_first else h
        ffn = self.ffn_output(self.ffn_intermediate(ffn_input))
        y = h + self.ffn_dropout(ffn, training=training)
        return y if self.norm_first else self.ffn_norm(y)

    def call(self, inputs, states, training=False):
        check_float(self, inputs)
        attended, new_states = self.attention.call_token(self._attention_input(inputs), states[1:])
        outputs = self._rest_of_block(inputs, attended, training)
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
        return self._rest_of_block(sequences, attended, training), new_states

    def get_initial_state(self, batch_size=None):
        # The attention's output has the block's width, so its states have the block's sizes.
        return self.attention.get_initial_state(batch_size)

    def arg_config(self):
        """The constructor arguments, serialized (no base-layer keys)."""
        return {
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "ffn_dim": self.ffn_dim,
            "activation": keras.activations.serialize(self.activation),
            "dropout": self.dropout,
            "norm_first": self.norm_first,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "query_initializer": (
                None
                if self.query_initializer is None
                else keras.initializers.serialize(self.query_initializer)
            ),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
        }

    def get_config(self):
        return {**super().get_config(), **self.arg_config()}


@keras.saving.register_keras_serializable(package="keras_aaren")
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
        value_dim: int, size of each head's value; defaults to `key_dim`.
        ffn_dim: int, width of the feed-forward hidden layer; defaults to `4 * width`.
        activation: activation of the feed-forward hidden layer.
        dropout: float in [0, 1), dropout after Aaren and after the feed-forward network.
        norm_first: bool, pre-norm (True) or post-norm (False, default).
        layer_norm_epsilon: float, epsilon of the LayerNormalization layers.
        use_bias: bool, whether the projections and dense layers use biases.
        kernel_initializer: initializer of all kernels.
        bias_initializer: initializer of all biases.
        query_initializer: initializer of the learned query token.
        kernel_regularizer: regularizer of all kernels.
        bias_regularizer: regularizer of all biases.
        method: the scan, as for `Aaren` (`"sequential"` steps the cell).
        return_sequences: bool, output every timestep (default True: blocks stack) or the last.
        return_state: bool, also return the final states `[y, c]`.
        go_backwards: bool, process the sequence backwards.
        stateful: bool, carry the state from one batch to the next.
        unroll: bool, unroll the step loop (`method="sequential"` only).
        zero_output_for_mask: bool, zeros instead of the previous output at masked steps.
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

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        ffn_dim=None,
        activation="relu",
        dropout=0.0,
        norm_first=False,
        layer_norm_epsilon=1e-5,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        query_initializer=None,
        kernel_regularizer=None,
        bias_regularizer=None,
        method="auto",
        return_sequences=True,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        zero_output_for_mask=False,
        **kwargs,
    ):
        cell = AarenBlockCell(
            num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            ffn_dim=ffn_dim,
            activation=activation,
            dropout=dropout,
            norm_first=norm_first,
            layer_norm_epsilon=layer_norm_epsilon,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            query_initializer=query_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            name="aaren_block_cell",
        )
        super().__init__(
            cell,
            method=method,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            zero_output_for_mask=zero_output_for_mask,
            **kwargs,
        )

    num_heads = cell_attribute("num_heads")
    key_dim = cell_attribute("key_dim")
    value_dim = cell_attribute("value_dim")
    ffn_dim = cell_attribute("ffn_dim")
    activation = cell_attribute("activation")
    dropout = cell_attribute("dropout")
    norm_first = cell_attribute("norm_first")
    layer_norm_epsilon = cell_attribute("layer_norm_epsilon")
    use_bias = cell_attribute("use_bias")
    kernel_initializer = cell_attribute("kernel_initializer")
    bias_initializer = cell_attribute("bias_initializer")
    query_initializer = cell_attribute("query_initializer")
    kernel_regularizer = cell_attribute("kernel_regularizer")
    bias_regularizer = cell_attribute("bias_regularizer")
