"""Aaren in a Transformer encoder block: the block cell and the parallel block layer.

Shape letters used in this module: B batch, T timesteps, F model width (features).
"""

import keras
from keras import backend, ops

from keras_aaren.compat import DropoutRNNCell
from keras_aaren.layers.aaren import AarenCell
from keras_aaren.layers.base import AttentionCell, ParallelRNN, check_float, check_token_shape
from keras_aaren.validation import (
    check_bool,
    check_positive_float,
    check_positive_int,
    check_rate,
    check_seed,
)


def _call_layer(layer, x):
    return layer(x)


def _token_layer_norm(layer, x):
    """A `keras.layers.LayerNormalization` over the last axis, as the ops that ONNX Runtime
    fuses into one `LayerNormalization`: `(x - mean) / sqrt(variance + epsilon) * gamma +
    beta`, with the variance the mean of `(x - mean) ** 2`.

    Keras' own form (`x * inv + (-mean * inv)`, `inv = rsqrt(variance + epsilon) * gamma`)
    equals it to rounding but is a dozen small ops in an exported one-token step. Computed in
    at least float32 and returned in the layer's compute dtype, as the layer does.
    """
    dtype = backend.result_type(x.dtype, "float32")
    x = ops.cast(x, dtype)
    centered = x - ops.mean(x, axis=-1, keepdims=True)
    variance = ops.mean(ops.power(centered, 2), axis=-1, keepdims=True)
    outputs = centered / ops.sqrt(variance + layer.epsilon)
    if layer.scale:
        outputs = outputs * ops.cast(layer.gamma, dtype)
    if layer.center:
        outputs = outputs + ops.cast(layer.beta, dtype)
    return ops.cast(outputs, layer.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_aaren")
class AarenBlockCell(DropoutRNNCell, AttentionCell):
    """Cell of a Transformer encoder block whose attention is Aaren (arXiv 2405.13956).

    The block runs one token at a time with the constant-size state of its `AarenCell`; every
    other part of the block (residuals, LayerNormalization, feed-forward network, dropout) acts
    on each token alone, so a stack of blocks streams exactly like one Aaren layer. Wrap it in
    `keras.layers.RNN`, or use `layer.cell` of a trained `AarenBlock`. Its first state is its
    previous output, of the input's width: `keras.layers.RNN` reads the state sizes when it is
    constructed, so build the cell (`cell.build((batch_size, width))`) before you wrap it.

    Post-norm (the default, as in the original Transformer encoder):

    $$h = \\operatorname{LN}_1(x + \\operatorname{Aaren}(x)), \\qquad
    y = \\operatorname{LN}_2(h + \\operatorname{FFN}(h))$$

    pre-norm (`norm_first=True`):

    $$h = x + \\operatorname{Aaren}(\\operatorname{LN}_1(x)), \\qquad
    y = h + \\operatorname{FFN}(\\operatorname{LN}_2(h))$$

    with $\\operatorname{FFN}(h) = \\sigma(h W_1 + b_1) W_2 + b_2$ and dropout on the outputs of
    Aaren and of the FFN. Dropout draws one mask per sequence (per call of `keras.layers.RNN`
    or of `AarenBlock`), the same at every token, as `LSTMCell` does; so the block drops the
    same way token by token and in parallel, whatever its `method`. Code names: `attention`
    (the `AarenCell`), `attention_norm` ($\\operatorname{LN}_1$), `ffn_norm`
    ($\\operatorname{LN}_2$), `ffn_intermediate` ($W_1$), `ffn_output` ($W_2$).

    Args:
        num_heads: int, number of Aaren heads.
        key_dim: int, size of each head's query and key (as in `MultiHeadAttention`).
        value_dim: int, size of each head's value; defaults to `key_dim`.
        ffn_dim: int, width of the feed-forward network's hidden layer; defaults to `4 * width`.
        activation: activation of the feed-forward network's hidden layer.
        dropout: float in [0, 1), dropout rate after Aaren and after the feed-forward network.
        norm_first: bool, pre-norm (True) or post-norm (False) residuals.
        layer_norm_epsilon: float, epsilon of both LayerNormalization layers.
        seed: int, the random seed of the dropout.
        use_bias: bool, whether the projections use bias vectors.
        kernel_initializer: initializer of the kernels.
        bias_initializer: initializer of the biases.
        query_initializer: initializer of the learned query token; `None` means
            `RandomNormal(stddev=1.0)`, which gives queries of the scale that
            `MultiHeadAttention` computes from normalized inputs.
        kernel_regularizer: regularizer of the kernels.
        bias_regularizer: regularizer of the biases.
        query_regularizer: regularizer of the learned query token.
        kernel_constraint: constraint of the kernels.
        bias_constraint: constraint of the biases.
        query_constraint: constraint of the learned query token.
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
        >>> cell.build((None, 16))  # its width, which keras.layers.RNN reads when constructed
        >>> y = keras.layers.RNN(cell, return_sequences=True)(np.random.rand(3, 7, 16))
        >>> tuple(y.shape)
        (3, 7, 16)
    """

    #: The block's own constructor arguments, beside the attention cell's.
    BLOCK_ARGUMENTS = (
        "ffn_dim",
        "activation",
        "dropout",
        "norm_first",
        "layer_norm_epsilon",
        "seed",
    )

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        ffn_dim=None,
        activation="relu",
        dropout=0.0,
        norm_first=False,
        layer_norm_epsilon=1e-05,
        seed=None,
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
        check_positive_int("ffn_dim", ffn_dim, allow_none=True)
        check_rate("dropout", dropout)
        check_bool("norm_first", norm_first)
        check_positive_float("layer_norm_epsilon", layer_norm_epsilon)
        check_seed("seed", seed)
        super().__init__(
            num_heads,
            key_dim,
            value_dim=value_dim,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            query_initializer=query_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            query_regularizer=query_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            query_constraint=query_constraint,
            **kwargs,
        )
        self.ffn_dim = ffn_dim
        self.activation = keras.activations.get(activation)
        self.dropout = dropout
        self.norm_first = norm_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.seed = seed
        self.attention = None
        # Dropout draws one mask for the attention's output and one for the feed-forward
        # network's, per sequence. Stepped by `keras.layers.RNN`, the block reads the masks
        # Keras draws once per call for a `DropoutRNNCell` (which reads these attributes; see
        # `keras_aaren.compat`); its parallel form draws them itself (`dropout_masks`).
        self.recurrent_dropout = 0.0
        self.dropout_mask_count = 2
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def output_size(self):
        return self.input_dim

    def unknown_width_message(self):
        return (
            f"AarenBlockCell '{self.name}' does not know its state size yet: its output, and "
            "so its first state, has the width of its input, which it learns when it is "
            "built, while keras.layers.RNN reads the state sizes when it is constructed. Build "
            "the cell first (`cell.build((batch_size, width))`), or use `AarenBlock`, which "
            "learns the width from its input. Received: an unbuilt cell"
        )

    def build(self, input_shape):
        check_token_shape(self, input_shape)
        width = int(input_shape[-1])
        self.input_dim = width
        # The attention takes every projection argument; the dense layers those they have.
        dense = dict(
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
        )
        policy = dict(dtype=self.dtype_policy)
        self.attention = AarenCell(
            self.num_heads,
            self.key_dim,
            value_dim=self.value_dim,
            output_dim=width,
            query_initializer=self.query_initializer,
            query_regularizer=self.query_regularizer,
            query_constraint=self.query_constraint,
            name="attention",
            **dense,
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

        token_shape = tuple(input_shape)
        self.attention.build(token_shape)
        self.attention_norm.build(token_shape)
        self.ffn_norm.build(token_shape)
        self.ffn_intermediate.build(token_shape)
        self.ffn_output.build(token_shape[:-1] + (self.ffn_intermediate.units,))
        self.built = True

    def _attention_input(self, x, norm=None):
        norm = norm or _call_layer
        return norm(self.attention_norm, x) if self.norm_first else x

    def dropout_masks(self, token):
        """Two fresh dropout masks of a token's shape, `(batch_size, width)`: for the
        attention's output and for the feed-forward network's."""
        ones = ops.ones_like(token)
        return [
            keras.random.dropout(ones, rate=self.dropout, seed=self.seed_generator)
            for _ in range(2)
        ]

    def _rest_of_block(self, x, attended, masks, norm=None):
        """Everything after the attention, which acts on each token alone.

        `masks`: the two dropout masks `(batch_size, width)`, or None for no dropout; they
        broadcast over the time axis of a sequence. Keras' `LayerNormalization` and `Dense`
        act on the last axis, so they take a token and a sequence alike. `norm(layer, x)`
        applies one of the block's normalization layers (by default, calls it).
        """
        norm = norm or _call_layer
        if masks is None:
            drop_attention = drop_ffn = lambda t: t
        else:
            if len(x.shape) == 3:
                masks = [mask[:, None] for mask in masks]
            drop_attention, drop_ffn = (
                lambda t, mask=mask: t * ops.cast(mask, t.dtype) for mask in masks
            )
        h = x + drop_attention(attended)
        if not self.norm_first:
            h = norm(self.attention_norm, h)
        ffn_input = norm(self.ffn_norm, h) if self.norm_first else h
        ffn = self.ffn_output(self.ffn_intermediate(ffn_input))
        y = h + drop_ffn(ffn)
        return y if self.norm_first else norm(self.ffn_norm, y)

    def call(self, inputs, states, training=False):
        check_float(self, inputs)
        attention_input = self._attention_input(inputs, _token_layer_norm)
        attended, new_states = self.attention.call_token(attention_input, states[1:])
        # Stepped by keras.layers.RNN, the masks are those it drew for this call.
        masks = self.get_dropout_mask(inputs) if training and self.dropout > 0 else None
        outputs = self._rest_of_block(inputs, attended, masks, _token_layer_norm)
        return outputs, [ops.cast(outputs, states[0].dtype), *new_states]

    def call_sequence(
        self,
        sequences,
        states,
        mask=None,
        method="auto",
        last_only=False,
        training=False,
        segment_ids=None,
        sharding=None,
    ):
        """The parallel form of the block over `(batch_size, timesteps, width)`, with the
        attention's state `[c]`; see `AarenCell.call_sequence`. With `training`, the dropout
        masks are drawn here, once for the sequence."""
        attended, new_states = self.attention.call_sequence(
            self._attention_input(sequences),
            states,
            mask=mask,
            method=method,
            last_only=last_only,
            segment_ids=segment_ids,
            sharding=sharding,
        )
        masks = None
        if training and self.dropout > 0:
            masks = self.dropout_masks(sequences[:, 0])
        if last_only:
            sequences = sequences[:, -1:]
        outputs = self._rest_of_block(sequences, attended, masks)
        return outputs, new_states

    def get_initial_state(self, batch_size=None):
        # The attention's output has the block's width, so its states have the block's sizes.
        return self.attention.get_initial_state(batch_size)

    def get_config(self):
        config = {
            "ffn_dim": self.ffn_dim,
            "activation": keras.activations.serialize(self.activation),
            "dropout": self.dropout,
            "norm_first": self.norm_first,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}


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
        ffn_dim: int, width of the feed-forward network's hidden layer; defaults to `4 * width`.
        activation: activation of the feed-forward network's hidden layer.
        dropout: float in [0, 1), dropout rate after Aaren and after the feed-forward network.
        norm_first: bool, pre-norm (True) or post-norm (False) residuals.
        layer_norm_epsilon: float, epsilon of both LayerNormalization layers.
        seed: int, the random seed of the dropout.
        use_bias: bool, whether the projections use bias vectors.
        kernel_initializer: initializer of the kernels.
        bias_initializer: initializer of the biases.
        query_initializer: initializer of the learned query token; `None` means
            `RandomNormal(stddev=1.0)`, which gives queries of the scale that
            `MultiHeadAttention` computes from normalized inputs.
        kernel_regularizer: regularizer of the kernels.
        bias_regularizer: regularizer of the biases.
        query_regularizer: regularizer of the learned query token.
        kernel_constraint: constraint of the kernels.
        bias_constraint: constraint of the biases.
        query_constraint: constraint of the learned query token.
        method: how the sequence is computed: `"auto"` (the default, `"chunked"` on every
            backend), `"chunked"`, `"associative"` (the paper's parallel prefix scan), or
            `"sequential"` (the `keras.layers.RNN` step loop over the cell). See
            `keras_aaren.ops.aaren_scan`.
        return_sequences: bool, return the output at every timestep, or only the last.
        return_state: bool, also return the final states `[y, c]` (see the cell).
        go_backwards: bool, process the sequence backwards and return the reversed sequence.
        stateful: bool, the final states of a batch are the initial states of the next one.
        unroll: bool, unroll the step loop; used only by `method="sequential"`.
        zero_output_for_mask: bool, output zeros at masked timesteps instead of the previous
            output (only with `return_sequences=True`, as in `keras.layers.RNN`).
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        sequences: tensor `(batch_size, timesteps, width)`.
        initial_state: optional list `[y, c]` (see `AarenBlockCell`), e.g. from a call
            with `return_state=True`.
        mask: optional boolean tensor `(batch_size, timesteps)`.
        training: bool, whether dropout is active.
        segment_ids: optional integer tensor `(batch_size, timesteps)` for sequences packed in
            one row, as for `Aaren`; the block's per-token parts need nothing more.

    Returns:
        `(batch_size, timesteps, width)` (or `(batch_size, width)` without `return_sequences`),
        followed by the two final states with `return_state`.

    Raises:
        ValueError: as `AarenBlockCell`, plus an unknown `method`, a non-float or wrongly shaped
            input, a `mask`, `segment_ids` or `initial_state` of the wrong shape, or
            `segment_ids` that are not integers.

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
        layer_norm_epsilon=1e-05,
        seed=None,
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
            key_dim,
            value_dim=value_dim,
            ffn_dim=ffn_dim,
            activation=activation,
            dropout=dropout,
            norm_first=norm_first,
            layer_norm_epsilon=layer_norm_epsilon,
            seed=seed,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            query_initializer=query_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            query_regularizer=query_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            query_constraint=query_constraint,
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

    @property
    def ffn_dim(self):
        return self.cell.ffn_dim

    @property
    def activation(self):
        return self.cell.activation

    @property
    def dropout(self):
        return self.cell.dropout

    @property
    def norm_first(self):
        return self.cell.norm_first

    @property
    def layer_norm_epsilon(self):
        return self.cell.layer_norm_epsilon

    @property
    def seed(self):
        return self.cell.seed

    def get_config(self):
        cell = self.cell.get_config()
        block = {name: cell[name] for name in AarenBlockCell.BLOCK_ARGUMENTS}
        return {**super().get_config(), **block}
