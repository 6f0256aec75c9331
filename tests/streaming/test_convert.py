"""keras_aaren.streaming.convert: the stateful copy and the one-token step against the parallel
model on the same inputs, and their argument checks."""

import keras
import numpy as np
import pytest
from helpers import assert_close, data, to_numpy
from streaming_models import (
    BATCH,
    STEPS,
    WIDTH,
    every_recurrent_kind,
    functional_mixed,
    prefix_outputs,
    sequential_blocks,
)

from keras_aaren import Aaren, AarenBlock, streaming


def test_to_streaming_chunks_and_tokens(model_and_data):
    model, x, expected = model_and_data
    stream = streaming.to_streaming(model, BATCH)
    assert stream.inputs[0].shape == (BATCH, None, 3)
    tokens = [to_numpy(stream(x[:, t : t + 1])) for t in range(STEPS)]
    assert_close(np.concatenate(tokens, axis=1), expected)
    assert streaming.reset_states(stream) >= 2
    chunks = [to_numpy(stream(x[:, a:b])) for a, b in [(0, 7), (7, 8), (8, STEPS)]]
    assert_close(np.concatenate(chunks, axis=1), expected)


def test_predict_on_batch_continues_the_stream(model_and_data, request):
    model, x, expected = model_and_data
    if keras.backend.backend() == "jax" and "functional_mixed" in request.node.name:
        # Keras' own RNN layers (the LSTM and the stepped AarenCell here) keep their stateful
        # states outside the variables that JAX's compiled predict carries; Aaren layers do not.
        reason = "keras.layers.RNN's stateful states do not survive JAX's compiled predict"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    stream = streaming.to_streaming(model, BATCH)
    bounds = [(0, 1), (1, 9), (9, STEPS)]
    chunks = [stream.predict_on_batch(x[:, a:b]) for a, b in bounds]
    assert_close(np.concatenate(chunks, axis=1), expected)


def test_step_function_matches_parallel(model_and_data):
    model, x, expected = model_and_data
    step = streaming.make_step_function(model, BATCH)
    states = step.initial_states()
    shapes = [tuple(s.shape) for s in states]
    outputs = []
    for t in range(STEPS):
        y, states = step(x[:, t], states)
        outputs.append(to_numpy(y))
        # The state has the same fixed structure whatever the number of tokens seen.
        assert [tuple(s.shape) for s in states] == shapes
    assert_close(np.stack(outputs, axis=1), expected)


def test_step_reset_starts_a_new_stream_in_one_row(model_and_data):
    # Each row runs its own stream; a reset in one row starts that row afresh (its outputs are
    # the model's on the new sequence alone) and leaves the other rows' streams as they were.
    model, x, expected = model_and_data
    fresh = data(BATCH, STEPS, 3, seed=2)
    reset_at = 5
    reset = np.zeros(BATCH, bool)
    reset[0] = True
    step = streaming.make_step_function(model, BATCH)
    states = step.initial_states()
    outputs = []
    for t in range(STEPS):
        source = x[:, t].copy()
        if t >= reset_at:
            source[0] = fresh[0, t - reset_at]
        y, states = step(source, states, reset=reset if t == reset_at else None)
        outputs.append(to_numpy(y))
    outputs = np.stack(outputs, axis=1)
    assert_close(outputs[1:], expected[1:], what="rows left alone")
    assert_close(outputs[0, :reset_at], expected[0, :reset_at], what="row 0 before its reset")
    restarted = to_numpy(model(fresh[:1, : STEPS - reset_at]))[0]
    assert_close(outputs[0, reset_at:], restarted, what="row 0 after its reset")


@pytest.mark.parametrize(
    "reset, match",
    [
        (np.zeros(BATCH + 1, bool), r"`reset` must be a boolean array of shape"),
        (np.zeros(BATCH, "int32"), r"`reset` must be a boolean array.*int32"),
    ],
    ids=["wrong-size", "integers"],
)
def test_step_reset_checks_its_argument(reset, match):
    step = streaming.make_step_function(sequential_blocks(), BATCH)
    with pytest.raises(ValueError, match=match):
        step(np.zeros((BATCH, 3), "float32"), step.initial_states(), reset=reset)


def _stream_steps(step, x):
    """The step's outputs for `x` fed token by token from zero states, and the final states."""
    states = step.initial_states()
    outputs = []
    for t in range(x.shape[1]):
        y, states = step(x[:, t], states)
        outputs.append(to_numpy(y))
    return outputs, states


def test_step_steps_every_kind_of_recurrent_layer():
    # The step's output at each token is the parallel model's on the prefix up to that token:
    # the model ends in a recurrent layer's last output, so its output has no time axis.
    model = every_recurrent_kind()
    x = data(BATCH, 6, 3, seed=6)
    step = streaming.make_step_function(model, BATCH)
    # One state per int in each cell's `state_size`, the stack's nested sizes flattened: GRU,
    # SimpleRNN, the stack (Aaren cell's y and c, LSTM cell's h and c), LSTM, Aaren.
    sizes = [WIDTH, WIDTH, WIDTH, 12, WIDTH, WIDTH, WIDTH, WIDTH, WIDTH, 12]
    assert [tuple(s.shape) for s in step.initial_states()] == [(BATCH, n) for n in sizes]
    outputs, _ = _stream_steps(step, x)
    for t, expected in enumerate(prefix_outputs(model, x, range(x.shape[1]))):
        assert_close(outputs[t], expected, atol=1e-6, what=f"token {t}")


def test_step_shares_the_weights_of_the_model():
    # No copy: a step made before the model's weights change computes with the new ones.
    model = sequential_blocks()
    step = streaming.make_step_function(model, BATCH)
    assert {id(v) for v in step.model.weights} == {id(v) for v in model.weights}
    rng = np.random.default_rng(8)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    x = data(BATCH, 8, 3, seed=9)
    outputs, _ = _stream_steps(step, x)
    assert_close(np.stack(outputs, axis=1), to_numpy(model(x)))


# Relative to the largest output. Both the parallel model and the step round to the half type;
# the step also rounds the states at every token, as keras.layers.RNN does. Measured: 1.2e-3 and
# 1.3e-2 on TensorFlow, 2.3e-3 and 7e-3 on JAX.
MIXED_TOLERANCE = {"mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}


@pytest.mark.parametrize("policy", list(MIXED_TOLERANCE))
def test_step_function_under_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    model = functional_mixed()
    x = data(BATCH, 12, 3, seed=10)
    expected = to_numpy(keras.ops.cast(model(x), "float32"))
    outputs, states = _stream_steps(streaming.make_step_function(model, BATCH), x)
    got = np.stack([o.astype("float32") for o in outputs], axis=1)
    assert np.abs(got - expected).max() <= MIXED_TOLERANCE[policy] * np.abs(expected).max()
    # The states cross the step's interface in float32, the dtype of `initial_states`.
    assert {keras.backend.standardize_dtype(s.dtype) for s in states} == {"float32"}


@pytest.mark.parametrize("tokens_per_call", [3, 8], ids=lambda n: f"N{n}")
def test_step_function_takes_several_tokens_per_call(model_and_data, tokens_per_call):
    # 24 tokens in calls of 3 or 8, the state carried from call to call.
    model, x, expected = model_and_data
    step = streaming.make_step_function(model, BATCH, tokens_per_call=tokens_per_call)
    states = step.initial_states()
    outputs = []
    for t in range(0, STEPS, tokens_per_call):
        y, states = step(x[:, t : t + tokens_per_call], states)
        assert tuple(y.shape) == (BATCH, tokens_per_call, *expected.shape[2:])
        outputs.append(to_numpy(y))
    assert_close(np.concatenate(outputs, axis=1), expected)
    # The final state is the one-token step's after the same tokens.
    one = streaming.make_step_function(model, BATCH)
    single = one.initial_states()
    for t in range(STEPS):
        _, single = one(x[:, t], single)
    for a, b in zip(states, single):
        assert_close(to_numpy(a), to_numpy(b))


def test_bad_streaming_arguments():
    model = sequential_blocks()
    for batch_size in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer.*Received"):
            streaming.to_streaming(model, batch_size)
        with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer.*Received"):
            streaming.make_step_model(model, batch_size)
    with pytest.raises(ValueError, match=r"`model` must be a keras.Model.*Received: model='m'"):
        streaming.to_streaming("m", BATCH)
    flat = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(
        ValueError, match=r"one input of shape .*Received input shapes: \[\(None, 3\)\]"
    ):
        streaming.to_streaming(flat, BATCH)
    step = streaming.make_step_function(model, BATCH)
    states = step.initial_states()
    with pytest.raises(ValueError, match=r"`x` must be one token .* = \(2, 3\).*\(2, 4\)"):
        step(np.zeros((BATCH, 4), "float32"), states)
    with pytest.raises(ValueError, match="`states` must have shapes"):
        step(np.zeros((BATCH, 3), "float32"), states[:-1])
    for tokens_per_call in (0, 1.5, "3"):
        with pytest.raises(ValueError, match=r"`tokens_per_call` must be a positive integer"):
            streaming.make_step_function(model, BATCH, tokens_per_call=tokens_per_call)
    chunk = streaming.make_step_function(model, BATCH, tokens_per_call=3)
    with pytest.raises(ValueError, match=r"`x` must be `tokens_per_call` tokens .* = \(2, 3, 3\)"):
        chunk(np.zeros((BATCH, 3), "float32"), states)
    inner = keras.Sequential([keras.Input((None, WIDTH)), AarenBlock(2, 4, ffn_dim=8)])
    nested = keras.Sequential([keras.Input((None, 3)), keras.layers.Dense(WIDTH), inner])
    with pytest.raises(ValueError, match="nested model"):
        streaming.make_step_model(nested, BATCH)
    stream = streaming.to_streaming(nested, BATCH)
    x = data(BATCH, 6, 3, seed=5)
    assert_close(
        np.concatenate([to_numpy(stream(x[:, t : t + 1])) for t in range(6)], 1),
        to_numpy(nested(x)),
    )


def _shared_dense(inputs):
    dense = keras.layers.Dense(3)
    return dense(dense(inputs))


def _initial_state_from_the_graph(inputs):
    first = keras.layers.LSTM(4, return_sequences=True, return_state=True)
    sequence, *states = first(inputs)
    second = keras.layers.LSTM(4, return_sequences=True, name="second")
    return second(sequence, initial_state=states)


@pytest.mark.parametrize(
    "build, message",
    [
        (_shared_dense, "cannot replay an input of layer 'aaren' .* a layer that the model calls"),
        (keras.ops.tanh, "cannot replay an input of layer 'aaren' .* or of a keras.ops function"),
        (_initial_state_from_the_graph, "Layer 'second' .* more than its input sequence"),
    ],
    ids=["shared_layer", "keras_ops", "initial_state"],
)
def test_step_model_refuses_a_graph_it_cannot_replay(build, message):
    inputs = keras.Input((None, 3))
    outputs = Aaren(1, 2, return_sequences=True, name="aaren")(build(inputs))
    with pytest.raises(ValueError, match=message):
        streaming.make_step_model(keras.Model(inputs, outputs), BATCH)


def test_step_model_refuses_a_mask_by_name():
    # One token at a time a masked token is not sent; a mask-producing layer is refused, not
    # replayed with a graph that Keras' mask inputs would break.
    inputs = keras.Input((None, 3))
    x = keras.layers.Masking(name="pad")(inputs)
    model = keras.Model(inputs, keras.layers.GRU(4, return_sequences=True)(x))
    with pytest.raises(ValueError, match="Layer 'pad' .* attaches a mask"):
        streaming.make_step_model(model, batch_size=2)
