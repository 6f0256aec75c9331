"""The rewrite of a trained model into streaming forms: a stateful copy, and a one-token step.

`to_streaming` copies the model with every recurrent layer made stateful, for chunks of any
length. `make_step_model` replays the model's layer graph on one token, calling each recurrent
layer's cell once with that layer's states as explicit inputs and outputs, and sharing every
layer, so every weight, with the model; `make_step_function` compiles that step once for its
fixed shapes, and the exports of `keras_aaren.streaming.export` write it out. Both forms first
check that the model can stream at all (see `keras_aaren.streaming`).
"""

import functools

import keras
import numpy as np

from keras_aaren.ops.segments import reset_rows
from keras_aaren.streaming.causality import check_streamable
from keras_aaren.streaming.walk import check_layer, is_graph_model
from keras_aaren.validation import check_positive_int


def _check_streamable(model):
    check_layer("model", model)
    check_streamable(model)


def _check_batch_size(batch_size):
    check_positive_int("batch_size", batch_size)


def to_streaming(model, batch_size):
    """A stateful copy of a model, for streaming: fixed batch size, any number of timesteps.

    Every recurrent layer (Aaren, AarenBlock, Keras RNNs) becomes `stateful=True`; the weights
    are copied from `model`. Call the copy on chunks of the stream, one token
    (`(batch_size, 1, features)`) or many, and it continues where it stopped; outputs equal
    those of `model` on the whole stream. `reset_states` starts a new stream.

    Args:
        model: a built Sequential or functional model with one input
            `(batch_size, timesteps, features)`.
        batch_size: int, the number of streams served side by side.

    Returns:
        A new `keras.Model` with the same weights.

    Raises:
        ValueError: if `batch_size` is not a positive integer, or the model has a layer that
            cannot stream (see `keras_aaren.streaming`), or not exactly one 3-D input.

    Examples:
        >>> import numpy as np
        >>> import keras
        >>> from keras_aaren import AarenBlock
        >>> from keras_aaren.streaming import to_streaming
        >>> model = keras.Sequential([keras.Input((None, 8)), AarenBlock(2, 4, ffn_dim=16)])
        >>> streaming = to_streaming(model, batch_size=3)
        >>> x = np.random.rand(3, 10, 8).astype("float32")
        >>> tokens = [streaming.predict_on_batch(x[:, t : t + 1]) for t in range(10)]
        >>> expected = model.predict(x, verbose=0)
        >>> bool(np.allclose(np.concatenate(tokens, axis=1), expected, atol=1e-5))
        True
    """
    _check_batch_size(batch_size)
    _check_streamable(model)
    return _stateful_copy(model, batch_size)


def _stateful_copy(model, batch_size):
    features = model.inputs[0].shape[-1]
    inputs = keras.Input(
        batch_shape=(batch_size, None, features),
        dtype=model.inputs[0].dtype,
        name=model.inputs[0].name,
    )

    def clone_layer(layer):
        # A nested model gets the same fixed batch size: a stateful RNN needs a static one.
        if is_graph_model(layer):
            return _stateful_copy(layer, batch_size)
        config = layer.get_config()
        if isinstance(layer, keras.layers.RNN):
            config["stateful"] = True
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


@keras.saving.register_keras_serializable(package="keras_aaren")
class CellStep(keras.layers.Layer):
    """One token through a recurrent layer's cell: that layer's part of a step model.

    Called on the token as the recurrent layer saw its sequences, `(batch_size, 1, features)`
    (or without the time axis, `(batch_size, features)`), and the flat list of its cell's
    states (`keras.tree.flatten(cell.state_size)` order), it calls the cell once
    (`training=False`) and returns `(outputs, new_states)`: `outputs` as the layer returns them
    for that token (its compute dtype; a time axis of 1 with `return_sequences` when the token
    came with one, none otherwise; its final states after the output with `return_state`),
    `new_states` in the dtypes of the states it was given. It holds the cell itself, so a step
    model shares the trained model's weights.

    Args:
        cell: the recurrent layer's cell.
        return_sequences: bool, as the recurrent layer's.
        return_state: bool, as the recurrent layer's.
        **kwargs: base layer keyword arguments; `make_step_model` passes the recurrent layer's
            name and dtype policy.
    """

    def __init__(self, cell, return_sequences=False, return_state=False, **kwargs):
        # The states keep the dtype they are given (the step's interface keeps them in floatx
        # under mixed precision too); the cell casts them to its compute dtype, as
        # keras.layers.RNN does at every step.
        super().__init__(autocast=False, **kwargs)
        self.cell = cell
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.built = True

    def call(self, sequence, states):
        sizes = self.cell.state_size
        # A stack of cells (StackedRNNCells) nests its cells' sizes.
        structure = [sizes] if isinstance(sizes, int) else list(sizes)
        with_time_axis = len(sequence.shape) == 3
        token = sequence
        if with_time_axis:
            token = keras.ops.reshape(sequence, (-1, sequence.shape[-1]))
        output, new_states = self.cell(
            token, keras.tree.pack_sequence_as(structure, list(states)), training=False
        )
        new_states = keras.tree.flatten(new_states)
        output = keras.ops.cast(output, self.compute_dtype)
        if self.return_sequences and with_time_axis:
            output = keras.ops.reshape(output, (-1, 1, output.shape[-1]))
        outputs = [output]
        if self.return_state:
            outputs += [keras.ops.cast(s, self.compute_dtype) for s in new_states]
        return outputs, [keras.ops.cast(new, s.dtype) for new, s in zip(new_states, states)]

    def get_config(self):
        return {
            **super().get_config(),
            "cell": keras.saving.serialize_keras_object(self.cell),
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
        }

    @classmethod
    def from_config(cls, config):
        cell = keras.saving.deserialize_keras_object(config.pop("cell"))
        return cls(cell, **config)


def _check_no_mask(layer):
    # Keras records the mask a layer passes on (`_keras_mask`, as its masking guide shows) as
    # one more input of the layers after it. One token at a time, a masked token is simply not
    # sent: the step takes every token it is given as real.
    for tensor in keras.tree.flatten(layer.output):
        if getattr(tensor, "_keras_mask", None) is not None:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) attaches a mask, which the "
                "one-token step cannot take: leave masked tokens out of the stream instead "
                "(do not call the step for them), or serve the model with `to_streaming`."
            )


def _lookup(tensors, tensor, where):
    """The step's tensor for `tensor` of the model's graph (`where` it is used, for errors)."""
    if id(tensor) not in tensors:
        # The walk replays the first call of each layer in `model.layers` (`layer.input`,
        # `layer.output`): a layer's second call, and a keras.ops function, are not among them.
        raise ValueError(
            f"make_step_model cannot replay {where}: it is the output of a layer that the model "
            "calls more than once, or of a keras.ops function in the model's graph. Use "
            "to_streaming, or build the model with a layer of its own for each call."
        )
    return tensors[id(tensor)]


def _with_time_axis(expanded, tensor, step_tensor):
    """`step_tensor` with the time axis of 1 that `tensor` of the model's graph has.

    The step carries a token from one recurrent layer to the next without its time axis, as
    the cells take it: it gets the axis only where another layer needs it, once (`expanded`
    keeps it by the model's tensor).
    """
    if len(tensor.shape) != 3 or len(step_tensor.shape) != 2:
        return step_tensor
    if id(tensor) not in expanded:
        expanded[id(tensor)] = keras.ops.expand_dims(step_tensor, 1)
    return expanded[id(tensor)]


def _step_graph(model, batch_size):
    """The model's layer graph on one token, each recurrent layer's cell called once."""
    features = model.inputs[0].shape[-1]
    token = keras.Input(batch_shape=(batch_size, features), dtype=model.inputs[0].dtype, name="x")
    # Every layer but the recurrent ones sees the `(batch_size, 1, ...)` tensors it saw on
    # sequences; the cells take the token without its time axis (see CellStep).
    tensors, expanded = {id(model.inputs[0]): token}, {}
    state_inputs, state_outputs = [], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"Layer '{layer.name}' is a nested model; make_step_model needs a flat model. "
                "Use to_streaming, or build the model without nesting."
            )
        _check_no_mask(layer)
        where = f"an input of layer '{layer.name}' ({type(layer).__name__})"
        inputs = keras.tree.map_structure(
            functools.partial(_lookup, tensors, where=where), layer.input
        )
        if isinstance(layer, keras.layers.RNN):
            if not isinstance(inputs, keras.KerasTensor):
                raise ValueError(
                    f"Layer '{layer.name}' ({type(layer).__name__}) is called with more than its "
                    "input sequence (an `initial_state` or a mask from the model's graph); the "
                    "step carries every recurrent layer's state itself, from zeros for a new "
                    "stream."
                )
            # The built cell's sizes, not the layer's copy: a keras.layers.RNN copies them when
            # constructed, before an Aaren cell knows the size of its output.
            states = [
                keras.Input(batch_shape=(batch_size, size), name=f"{layer.name}_state_{i}")
                for i, size in enumerate(keras.tree.flatten(layer.cell.state_size))
            ]
            step = CellStep(
                layer.cell,
                return_sequences=layer.return_sequences,
                return_state=layer.return_state,
                name=layer.name,
                dtype=layer.dtype_policy,
            )
            outputs, new_states = step(inputs, states)
            state_inputs += states
            state_outputs += new_states
        else:
            inputs = keras.tree.map_structure(
                functools.partial(_with_time_axis, expanded), layer.input, inputs
            )
            outputs = layer(inputs)
        for original, new in zip(keras.tree.flatten(layer.output), keras.tree.flatten(outputs)):
            tensors[id(original)] = new
    output = _lookup(tensors, model.outputs[0], "the model's output")
    if len(output.shape) == 3:
        output = keras.ops.reshape(output, (batch_size, *output.shape[2:]))
    return keras.Model([token, *state_inputs], [output, *state_outputs], name="step")


def make_step_model(model, batch_size):
    """A stateless Keras model for one token: `[x_t, *states] -> [y_t, *new_states]`.

    `x_t` is `(batch_size, features)`; the states are the `(batch_size, size)` states of every
    recurrent layer in order (for each Aaren layer or block `[y, c]`), in `keras.config.floatx()`
    (float32 by default) under any dtype policy, all zeros for a new stream; `y_t` is the model's
    output for that token. The step calls each recurrent
    layer's cell once (with `training=False`) and every other layer on the
    `(batch_size, 1, features)` tensors it sees on sequences (after a recurrent layer that
    returns its last output only, `(batch_size, features)`). Every layer, and so every weight,
    is shared with `model`: the step follows later changes of the model's weights.

    Args:
        model: a built Sequential or flat functional model with one input
            `(batch_size, timesteps, features)` and one output.
        batch_size: int, the number of streams served side by side.

    Returns:
        A `keras.Model`; `initial_states(step_model)` gives the zero states.

    Raises:
        ValueError: as `to_streaming`, or for nested models, multiple outputs, layers that
            attach a mask (such as `Masking`: send only real tokens), layers called more than
            once, and recurrent layers given an `initial_state` by the model's graph.

    Examples:
        >>> import numpy as np
        >>> import keras
        >>> from keras_aaren import Aaren
        >>> from keras_aaren.streaming import initial_states, make_step_model
        >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4, return_sequences=True)])
        >>> step_model = make_step_model(model, batch_size=1)
        >>> [tuple(t.shape) for t in step_model.inputs]  # x_t, then y and c = (m, u, w)
        [(1, 3), (1, 3), (1, 12)]
        >>> x = np.random.rand(1, 3).astype("float32")
        >>> y, *states = step_model.predict_on_batch([x, *initial_states(step_model)])
        >>> bool(np.allclose(y, model.predict(x[:, None], verbose=0)[:, 0], atol=1e-5))
        True
    """
    _check_batch_size(batch_size)
    _check_streamable(model)
    if len(model.outputs) != 1:
        raise ValueError(
            f"make_step_model expects a model with one output. Received: {len(model.outputs)}"
        )
    return _step_graph(model, batch_size)


def initial_states(step_model):
    """Zero states ("nothing seen yet") for a step model from `make_step_model`.

    Args:
        step_model: a model from `make_step_model`.

    Returns:
        A list of zero numpy arrays, one per state input of `step_model`, in its order.

    Examples:
        >>> import keras
        >>> from keras_aaren import Aaren
        >>> from keras_aaren.streaming import initial_states, make_step_model
        >>> model = keras.Sequential([keras.Input((None, 3)), Aaren(2, 4)])
        >>> tuple(s.shape for s in initial_states(make_step_model(model, batch_size=5)))
        ((5, 3), (5, 12))
    """
    return [np.zeros(x.shape, dtype=x.dtype) for x in step_model.inputs[1:]]


def _check_step_inputs(step_model, x, states, tokens_per_call):
    token = tuple(step_model.inputs[0].shape)
    if tokens_per_call == 1:
        expected, what = token, "one token of shape (batch_size, features)"
    else:
        expected = (token[0], tokens_per_call, *token[1:])
        what = "`tokens_per_call` tokens of shape (batch_size, tokens_per_call, features)"
    if tuple(np.shape(x)) != expected:
        raise ValueError(f"`x` must be {what} = {expected}. Received: x.shape={tuple(np.shape(x))}")
    expected_states = [tuple(s.shape) for s in step_model.inputs[1:]]
    received = [tuple(np.shape(s)) for s in states]
    if received != expected_states:
        raise ValueError(f"`states` must have shapes {expected_states}. Received: {received}")


def _reset_rows(states, reset, batch_size):
    """`states` with the rows where `reset` is True set to nothing seen (zeros)."""
    dtype = keras.backend.standardize_dtype(getattr(reset, "dtype", np.asarray(reset).dtype))
    if tuple(np.shape(reset)) != (batch_size,) or dtype != "bool":
        raise ValueError(
            f"`reset` must be a boolean array of shape ({batch_size},), one flag per stream. "
            f"Received: reset.shape={tuple(np.shape(reset))}, reset.dtype={dtype}"
        )
    return reset_rows(list(states), keras.ops.convert_to_tensor(reset))


def make_step_function(model, batch_size, jit_compile=None, tokens_per_call=1):
    """`step(x_t, states, reset=None) -> (y_t, new_states)`, compiled once, for serving streams.

    A small model's step costs little beside the cost of calling it. When several tokens are at
    hand together (a Decision Transformer's return, state and action tokens of one timestep, a
    sensor's readings since the last call), `tokens_per_call` feeds them in one call: the step
    runs once per token inside the compiled function, and the result is the same as that many
    calls.

    Args:
        model: as for `make_step_model`.
        batch_size: int, the number of streams served side by side.
        jit_compile: on TensorFlow, passed to `tf.function` (None: TensorFlow's default).
        tokens_per_call: int, the tokens each call takes, in order. With 1 (the default), `x_t`
            is one token `(batch_size, features)` and `y_t` its output; with more, `x_t` is
            `(batch_size, tokens_per_call, features)` and `y_t` stacks the outputs on axis 1.

    A server that runs `batch_size` streams side by side starts a new stream in some rows
    without touching the others with `reset`, a boolean `(batch_size,)` that is True for the
    rows whose state starts again from nothing seen before this call's tokens, as a new segment
    does in a packed row (`segment_ids`).

    Returns:
        A `StepFunction`: `step(x_t, states, reset=None)`, with the step model as `step.model`
        and `step.initial_states()` for a new stream. On TensorFlow it runs a `tf.function`
        traced once for its fixed shapes, on JAX a `jax.jit` of the step model's stateless
        call; on PyTorch it calls the step model directly.

    Raises:
        ValueError: as `make_step_model`; if `tokens_per_call` is not a positive integer; when
            called, if `x_t`, `states` or `reset` has the wrong shape, or `reset` is not
            boolean.

    Examples:
        >>> import numpy as np
        >>> import keras
        >>> from keras_aaren import Aaren
        >>> from keras_aaren.streaming import make_step_function
        >>> model = keras.Sequential([keras.Input((None, 4)), Aaren(2, 3, return_sequences=True)])
        >>> step = make_step_function(model, batch_size=2)
        >>> x = np.random.rand(2, 6, 4).astype("float32")
        >>> states = step.initial_states()
        >>> outputs = []
        >>> for t in range(6):
        ...     y, states = step(x[:, t], states)
        ...     outputs.append(keras.ops.convert_to_numpy(y))
        >>> bool(np.allclose(np.stack(outputs, axis=1), model.predict(x, verbose=0), atol=1e-5))
        True
    """
    return StepFunction(model, batch_size, jit_compile, tokens_per_call)


class StepFunction:
    """The compiled one-token step of `make_step_function`: call it as
    `step(x_t, states, reset=None) -> (y_t, new_states)`.

    Attributes:
        model: the step model (`make_step_model`), sharing the trained model's weights.
        tokens_per_call: the tokens each call takes.
    """

    def __init__(self, model, batch_size, jit_compile=None, tokens_per_call=1):
        check_positive_int("tokens_per_call", tokens_per_call)
        self.model = make_step_model(model, batch_size)
        self.batch_size = batch_size
        self.tokens_per_call = tokens_per_call
        # What differs between backends: how the step is compiled, in `_compile`.
        self._run = self._compile(jit_compile)

    def initial_states(self):
        """Zero states, "nothing seen yet", for a new stream (see `initial_states`)."""
        return initial_states(self.model)

    def __call__(self, x, states, reset=None):
        _check_step_inputs(self.model, x, states, self.tokens_per_call)
        states = list(states)
        if reset is not None:
            states = _reset_rows(states, reset, self.batch_size)
        return self._run(x, states)

    def _tokens(self, one_token, x, states):
        """`one_token(x_t, states)` over the call's tokens, unrolled: their number is fixed
        when the function is traced."""
        if self.tokens_per_call == 1:
            return one_token(x, states)
        outputs = []
        for k in range(self.tokens_per_call):
            y, states = one_token(x[:, k], states)
            outputs.append(y)
        return keras.ops.stack(outputs, axis=1), states

    def _one_token(self, x, states):
        results = self.model([x, *states], training=False)
        return results[0], list(results[1:])

    def _compile(self, jit_compile):
        backend = keras.backend.backend()
        if backend == "jax":
            return self._compile_jax()
        if backend == "tensorflow":
            return self._compile_tensorflow(jit_compile)

        def run(x, states):
            x, *states = [keras.ops.convert_to_tensor(t) for t in (x, *states)]
            return self._tokens(self._one_token, x, states)

        return run

    def _compile_jax(self):
        import jax

        model = self.model

        @jax.jit
        def pure_step(trainable, non_trainable, x, states):
            def one_token(x, states):
                results, _ = model.stateless_call(
                    trainable, non_trainable, [x, *states], training=False
                )
                return results[0], list(results[1:])

            return self._tokens(one_token, x, states)

        def run(x, states):
            # A stateless call takes the weights as arguments: reading them at every call keeps
            # the step on the step model's current weights (after `step.model.set_weights`,
            # say), as the tf.function, which reads its variables, does.
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            return pure_step(trainable, non_trainable, x, states)

        return run

    def _compile_tensorflow(self, jit_compile):
        import tensorflow as tf

        token, *states = self.model.inputs
        shape = token.shape
        if self.tokens_per_call > 1:
            shape = (token.shape[0], self.tokens_per_call, *token.shape[1:])
        signature = [tf.TensorSpec(shape, token.dtype)]
        signature += [tf.TensorSpec(t.shape, t.dtype) for t in states]
        # Calling the traced concrete function skips tf.function's matching of the arguments
        # against its signature, which it would redo for every state tensor at every step: in a
        # small model that matching is a large part of the step.
        compiled = tf.function(
            lambda x, *states: self._tokens(self._one_token, x, list(states)),
            input_signature=signature,
            jit_compile=jit_compile,
        ).get_concrete_function()

        def convert(t, spec):
            # NumPy inputs are converted to the signature's dtypes, as tf.function does. Tensors
            # of that dtype (the states a step returned) go in as they are: converting them again
            # would add a conversion per state (two per Aaren layer or block) to every step.
            if isinstance(t, tf.Tensor) and t.dtype == spec.dtype:
                return t
            return tf.convert_to_tensor(t, spec.dtype)

        def run(x, states):
            return compiled(*(convert(t, s) for t, s in zip((x, *states), signature)))

        return run
