"""Aaren as Keras layers: the recurrent cell and the parallel sequence layer, one set of weights.

Shape letters used in this module: B batch, T timesteps, F input features, H heads,
K key dimension, D value dimension, O output features.
"""

import math

import keras
from keras import ops

from keras_aaren.layers.base import (
    AttentionCell,
    ParallelRNN,
    check_float,
    check_token_shape,
    current_token_spread,
    token_matmul,
)
from keras_aaren.ops import aaren_scan
from keras_aaren.ops.backend import matmul
from keras_aaren.ops.recurrence import aaren_step_flat, scan_dtype
from keras_aaren.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_aaren")
class AarenCell(AttentionCell):
    """Cell for the Aaren layer (Feng et al., "Attention as an RNN", arXiv 2405.13956).

    The cell processes one token at a time with a state of constant size, so a model trained with
    the parallel `Aaren` layer can serve a stream token by token with the very same weights:
    wrap it in `keras.layers.RNN` (with `stateful=True` for streaming, `return_state=True` to carry
    the state yourself) or stack it with other cells in `keras.layers.StackedRNNCells`.

    Each head attends with a learned query $q$ that does not depend on the input, so its output
    after token $t$ is a softmax-weighted mean of the values seen so far, updated in O(1):

    $$s_t = \\frac{q \\cdot k_t}{\\sqrt{d_k}}, \\quad q = \\bar q W_q + b_q, \\quad
    k_t = x_t W_k + b_k, \\quad v_t = x_t W_v + b_v$$

    $$m_t = \\max(m_{t-1}, s_t), \\qquad u_t = u_{t-1} e^{m_{t-1} - m_t} + e^{s_t - m_t}$$

    $$w_t = w_{t-1} e^{m_{t-1} - m_t} + v_t e^{s_t - m_t}, \\qquad
    y_t = \\operatorname{concat}_h(w_t / u_t)\\, W_o + b_o$$

    Code names: `query` is the learned token $\\bar q$ (one vector of the input width, projected to
    one query per head by `query_kernel` $W_q$, as in the paper, so that the parameter count is
    that of `keras.layers.MultiHeadAttention` plus $\\bar q$); `key_kernel` $W_k$,
    `value_kernel` $W_v$, `output_kernel` $W_o$.

    The states are `[y, c]`, like `LSTMCell`'s `[h, c]`: the previous output $y_{t-1}$,
    `(batch_size, output_dim)`, first, because Keras' RNN loop on JAX outputs the first state at a
    masked timestep; then the paper's state $(m, u, w)$ in one tensor $c$ of shape
    `(batch_size, 2 * num_heads + num_heads * value_dim)`: $m$ in its first `num_heads` columns,
    $u$ in the next `num_heads`, $w$ flattened in the rest. One tensor rather than three, because
    every state tensor costs a per-call overhead when a step is served. The all-zero state means
    "nothing seen yet".

    Args:
        num_heads: int, number of attention heads, each with its own learned query.
        key_dim: int, size of each head's query and key.
        value_dim: int, size of each head's value; defaults to `key_dim`.
        output_dim: int, width of the output; defaults to the width of the input.
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
        inputs: tensor of shape `(batch_size, features)`, one token.
        states: list `[y, c]` of shapes `(batch_size, output_dim)` and
            `(batch_size, 2 * num_heads + num_heads * value_dim)`.

    Returns:
        A tuple `(output, new_states)`: `output` of shape `(batch_size, output_dim)`, and the
        new states `[output, c]` in the dtypes of `states`.

    Raises:
        ValueError: if `num_heads`, `key_dim`, `value_dim` or `output_dim` is not a positive
            integer, an initializer, regularizer or constraint is unknown, if the input is not of
            shape `(batch_size, features)` with known
            `features`, or if the input is not floating-point.

    Examples:
        >>> import numpy as np
        >>> import keras
        >>> cell = AarenCell(num_heads=2, key_dim=8, output_dim=16)
        >>> streaming = keras.layers.RNN(cell, return_sequences=True)
        >>> y = streaming(np.random.rand(4, 10, 16).astype("float32"))
        >>> tuple(y.shape)
        (4, 10, 16)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        output_dim=None,
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
        check_positive_int("output_dim", output_dim, allow_none=True)
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
        self.output_dim = output_dim

    @property
    def output_size(self):
        return self.output_dim if self.output_dim is not None else self.input_dim

    def unknown_width_message(self):
        return (
            f"AarenCell '{self.name}' does not know its state size yet: with `output_dim=None` "
            "its output, and so its first state, has the width of its input, which it learns "
            "when it is built, while keras.layers.RNN reads the state sizes when it is "
            "constructed. Pass `output_dim` (the width of the input), build the cell first "
            "(`cell.build((batch_size, features))`), or use `Aaren`, which learns the width "
            "from its input. Received: output_dim=None on an unbuilt cell"
        )

    def build(self, input_shape):
        check_token_shape(self, input_shape)
        self.input_dim = int(input_shape[-1])
        heads, key_dim, value_dim = self.num_heads, self.key_dim, self.value_dim
        output_dim = self.output_size
        # The weights that make the scores stay in their own dtype under mixed precision (no
        # autocast): `project` computes the scores in float32, see there.
        self.query = self._weight("query", (self.input_dim,), "query", autocast=False)
        self.query_kernel = self._weight(
            "query_kernel", (self.input_dim, heads, key_dim), autocast=False
        )
        self.key_kernel = self._weight(
            "key_kernel", (self.input_dim, heads, key_dim), autocast=False
        )
        self.value_kernel = self._weight("value_kernel", (self.input_dim, heads, value_dim))
        self.output_kernel = self._weight("output_kernel", (heads, value_dim, output_dim))
        if self.use_bias:
            self.query_bias = self._weight("query_bias", (heads, key_dim), "bias", autocast=False)
            self.key_bias = self._weight("key_bias", (heads, key_dim), "bias", autocast=False)
            self.value_bias = self._weight("value_bias", (heads, value_dim), "bias")
            self.output_bias = self._weight("output_bias", (output_dim,), "bias")
        else:
            self.query_bias = self.key_bias = self.value_bias = self.output_bias = None
        self.built = True

    def _weight(self, name, shape, kind="kernel", autocast=True):
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=getattr(self, f"{kind}_initializer"),
            regularizer=getattr(self, f"{kind}_regularizer"),
            constraint=getattr(self, f"{kind}_constraint"),
            autocast=autocast,
        )

    def score_projection(self, dtype):
        """The kernel `(F, H)` and bias `(H,)` (None without biases) of the scores, in `dtype`.

        The query is one vector per head, so q . (x W_k + b_k) = x (W_k q) + b_k . q: it is
        folded into the key kernel, and the keys are never formed. It does not depend on the
        tokens, so a graph of frozen weights (an export) holds it as a constant.
        """
        heads, key_dim = self.num_heads, self.key_dim
        query = matmul(
            ops.cast(self.query[None], dtype),
            ops.cast(ops.reshape(self.query_kernel, (self.input_dim, -1)), dtype),
        )  # (1, H * K)
        if self.use_bias:
            query = query + ops.cast(ops.reshape(self.query_bias, (-1,)), dtype)
        query = ops.reshape(query, (heads, key_dim)) / math.sqrt(key_dim)
        score_kernel = ops.sum(ops.cast(self.key_kernel, dtype) * query, axis=-1)  # (F, H)
        score_bias = None
        if self.use_bias:
            score_bias = ops.sum(ops.cast(self.key_bias, dtype) * query, axis=-1)
        return score_kernel, score_bias

    def project(self, inputs, keep_time_axis=False):
        """Scores and values of tokens: `(..., F)` -> `(..., H)` and `(..., H, D)`.

        `keep_time_axis`: the products keep the sequence's axes (see `base.token_matmul`).
        """
        scores, values = self.project_flat(inputs, keep_time_axis)
        lead = tuple(ops.shape(inputs)[:-1])
        return scores, ops.reshape(values, lead + (self.num_heads, self.value_dim))

    def project_flat(self, inputs, keep_time_axis=False):
        """`project` with the values flat, head-major: `(..., F)` -> `(..., H)`, `(..., H * D)`."""
        # Scores are exponentiated, so they are computed in float32 even under mixed precision:
        # bfloat16 would move a score of 100 by up to 0.4, and its weight by 40%.
        score_dtype = scan_dtype(inputs.dtype)
        score_kernel, score_bias = self.score_projection(score_dtype)
        value_kernel = ops.reshape(self.value_kernel, (self.input_dim, -1))
        # Two products rather than one joint product of scores and values: TensorFlow
        # differentiates the slices of a joint product with padded gradients, and a quantizer
        # would give the scores and the values one range (an exported step quantizes them).
        scores = token_matmul(ops.cast(inputs, score_dtype), score_kernel, keep_time_axis)
        values = token_matmul(inputs, value_kernel, keep_time_axis)  # (..., H * D)
        if self.use_bias:
            scores = scores + score_bias
            values = values + ops.reshape(self.value_bias, (-1,))
        return scores, values

    def output_projection(self, attended, keep_time_axis=False):
        """The output of attended values: `(..., H, D)` -> `(..., O)`."""
        lead = tuple(ops.shape(attended)[:-2])
        attended = ops.reshape(attended, lead + (self.num_heads * self.value_dim,))
        kernel = ops.reshape(self.output_kernel, (self.num_heads * self.value_dim, -1))
        outputs = token_matmul(attended, kernel, keep_time_axis)
        if self.use_bias:
            outputs = outputs + self.output_bias
        return outputs

    def unflatten_state(self, states):
        """The state `[c]` after the previous output -> the paper's `(m, u, w)`.

        Args:
            states: list `[c]`, `c` of shape `(batch_size, 2 * num_heads + num_heads * value_dim)`.

        Returns:
            A tuple `(m, u, w)` of shapes `(batch_size, num_heads)`, `(batch_size, num_heads)`,
            `(batch_size, num_heads, value_dim)`.
        """
        (c,) = states
        heads = self.num_heads
        w = ops.reshape(c[:, 2 * heads :], (-1, heads, self.value_dim))
        return c[:, :heads], c[:, heads : 2 * heads], w

    def flatten_state(self, state, dtype):
        """The paper's `(m, u, w)` -> the state `[c]` after the previous output, in `dtype`."""
        m, u, w = state
        w = ops.reshape(w, (-1, self.num_heads * self.value_dim))
        return [ops.cast(ops.concatenate([m, u, w], axis=-1), dtype)]

    def call(self, inputs, states):
        outputs, new_states = self.call_token(inputs, states[1:])
        return outputs, [ops.cast(outputs, states[0].dtype), *new_states]

    def call_token(self, inputs, states):
        """One token with the paper's state `[c]` only (no previous output).

        Args:
            inputs: tensor `(batch_size, features)`.
            states: list `[c]`, the paper's $(m, u, w)$ in one tensor (see the class docstring).

        Returns:
            A tuple `(outputs, new_states)`: `(batch_size, output_dim)` and the new `[c]` in the
            dtype of `states`.
        """
        check_float(self, inputs)
        (c,) = states
        heads = self.num_heads
        # One split, and `w` kept flat (`aaren_step_flat`): a one-token step spends its time on
        # the number of ops it runs, not on their size.
        state = ops.split(c, [heads, 2 * heads], axis=-1)
        scores, values = self.project_flat(inputs)  # (B, H), (B, H * D)
        attended, new_state = aaren_step_flat(state, scores, values, current_token_spread())
        kernel = ops.reshape(self.output_kernel, (heads * self.value_dim, -1))
        outputs = matmul(attended, kernel)
        if self.use_bias:
            outputs = outputs + self.output_bias
        return outputs, [ops.cast(ops.concatenate(new_state, axis=-1), c.dtype)]

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
        """The parallel form: every timestep at once with `aaren_scan`.

        Args:
            sequences: tensor `(batch_size, timesteps, features)`.
            states: the incoming state `[c]` (without the previous output, which `ParallelRNN`
                tracks).
            mask: optional boolean tensor `(batch_size, timesteps)`.
            method: the `aaren_scan` method.
            last_only: return only the last timestep's output, `(batch_size, 1, output_dim)`.
            training: unused; part of the sequence-cell signature.
            segment_ids: optional integer tensor `(batch_size, timesteps)`; see `aaren_scan`.
            sharding: optional `keras_aaren.ops.SequenceSharding`, the devices that split the
                time axis; see `aaren_scan`.

        Returns:
            A tuple `(outputs, new_states)`: `(batch_size, timesteps, output_dim)` (or
            `(batch_size, 1, output_dim)` with `last_only`) and the final `[c]`.
        """
        split = sharding is not None
        scores, values = self.project(sequences, split)  # (B, T, H), (B, T, H, D)
        attended, final = aaren_scan(
            scores,
            values,
            initial_state=self.unflatten_state(states),
            mask=mask,
            method=method,
            segment_ids=segment_ids,
            sharding=sharding,
        )
        if last_only:
            attended = attended[:, -1:]
        outputs = self.output_projection(attended, split)
        return outputs, self.flatten_state(final, states[0].dtype)

    def get_initial_state(self, batch_size=None):
        return [ops.zeros((batch_size, size), dtype=self.compute_dtype) for size in self.state_size]

    def get_config(self):
        return {**super().get_config(), "output_dim": self.output_dim}


@keras.saving.register_keras_serializable(package="keras_aaren")
class Aaren(ParallelRNN):
    """Aaren layer: attention computed as an RNN, in parallel (Feng et al., arXiv 2405.13956).

    Use it where you would use `keras.layers.LSTM` or causal `keras.layers.MultiHeadAttention`
    over a sequence: it trains in parallel over the whole sequence like attention (a prefix scan,
    no step loop), and serves one token at a time in constant memory like an RNN, because its
    weights are those of its `AarenCell`: `keras.layers.RNN(layer.cell)` steps the very same
    weights, and a stateful `Aaren` fed a sequence in chunks gives the one-shot output.

    Each head attends causally with a learned, input-independent query $q$:

    $$o_k = \\sum_{i \\le k} \\frac{e^{s_i}}{\\sum_{j \\le k} e^{s_j}} v_i, \\qquad
    s_i = \\frac{q \\cdot k_i}{\\sqrt{d_k}}$$

    $$y_k = \\operatorname{concat}_h(o_k) W_o + b_o$$

    computed for all $k$ at once with the associative operator of the paper on states
    $(m, u, w)$ (running max, sum of weights, weighted sum of values):

    $$(m_A, u_A, w_A) \\oplus (m_B, u_B, w_B) = (m, u, w), \\qquad m = \\max(m_A, m_B)$$

    $$u = u_A e^{m_A - m} + u_B e^{m_B - m}, \\qquad w = w_A e^{m_A - m} + w_B e^{m_B - m}$$

    starting from the incoming state. The scan runs in float32 under mixed precision.
    `return_sequences`, `return_state`, `initial_state`, `stateful`, `go_backwards`,
    `zero_output_for_mask` and masking behave exactly as they do for `keras.layers.RNN`.

    Args:
        num_heads: int, number of attention heads, each with its own learned query.
        key_dim: int, size of each head's query and key.
        value_dim: int, size of each head's value; defaults to `key_dim`.
        output_dim: int, width of the output; defaults to the width of the input.
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
        sequences: tensor of shape `(batch_size, timesteps, features)`.
        initial_state: optional list `[y, c]` of shapes `(batch_size, output_dim)` and
            `(batch_size, 2 * num_heads + num_heads * value_dim)` (see `AarenCell`), e.g. the
            states returned by a previous call with `return_state=True`.
        mask: optional boolean tensor `(batch_size, timesteps)`, True for a real token; masked
            tokens change neither the state nor the output.
        training: bool, training or inference mode.
        segment_ids: optional integer tensor `(batch_size, timesteps)` for sequences packed
            in one row (`keras_aaren.pack_sequences`): a token whose id differs from the
            previous token's starts a new sequence from nothing seen, so each gets the outputs
            it gets alone. `initial_state` seeds the first segment; the final state is the
            last segment's.

    Returns:
        `(batch_size, timesteps, output_dim)` if `return_sequences`, else
        `(batch_size, output_dim)`; with `return_state`, followed by the two final states.

    Raises:
        ValueError: for a non-positive `num_heads`, `key_dim`, `value_dim` or `output_dim`, an
            unknown `method`, an input that is not `(batch_size, timesteps, features)` with known
            `features`, a sequence of no timesteps, integer inputs, a `mask`, `segment_ids`
            or `initial_state` whose shape does not match, or `segment_ids` that are not
            integers.

    Examples:
        >>> import numpy as np
        >>> import keras
        >>> x = np.random.rand(4, 10, 16).astype("float32")
        >>> layer = Aaren(num_heads=2, key_dim=8, return_sequences=True)
        >>> parallel = layer(x)
        >>> stepped = keras.layers.RNN(layer.cell, return_sequences=True)(x)
        >>> to_numpy = keras.ops.convert_to_numpy  # a tensor of any backend as a NumPy array
        >>> bool(np.allclose(to_numpy(parallel), to_numpy(stepped), atol=1e-5))
        True
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        output_dim=None,
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
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        zero_output_for_mask=False,
        **kwargs,
    ):
        cell = AarenCell(
            num_heads,
            key_dim,
            value_dim=value_dim,
            output_dim=output_dim,
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
            name="aaren_cell",
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
    def output_dim(self):
        return self.cell.output_dim

    def get_config(self):
        return {**super().get_config(), "output_dim": self.output_dim}
