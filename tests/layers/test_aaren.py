"""Aaren and AarenCell: the parallel layer against a numpy oracle and against keras.layers.RNN
stepping the same cell, plus Keras integration (masking, state, saving, training, bad input)."""

import keras
import numpy as np
import pytest
from helpers import (
    FEATURES,
    assert_close,
    data,
    gradients,
    make_mask,
    numpy_output,
    numpy_projections,
    skip_torch_jit_compile,
    to_numpy,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_aaren import Aaren, AarenBlock, AarenBlockCell, AarenCell, reset_states
from keras_aaren.layers.base import current_token_spread, token_spread
from keras_aaren.ops import METHODS, aaren_attention_naive
from keras_aaren.ops.recurrence import SPREADS


def numpy_oracle(cell, x):
    """The layer's math from its weights: numpy projections around the naive softmax attention."""
    scores, values = numpy_projections(cell, x)
    attended, _ = aaren_attention_naive(scores, values)
    return numpy_output(cell, to_numpy(attended))


@pytest.mark.parametrize("steps", [1, 63, 100], ids=lambda t: f"B3-T{t}-H2-D4")
@pytest.mark.parametrize("method", METHODS)
def test_parallel_matches_numpy_oracle(method, steps):
    x = data(3, steps, scale=3.0)
    layer = Aaren(2, 4, output_dim=5, method=method, return_sequences=True)
    assert_close(layer(x), numpy_oracle(layer.cell, x), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("steps", [1, 23], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("mask_kind", [None, "left", "right", "holes"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("return_sequences", [True, False], ids=["seq", "last"])
@pytest.mark.parametrize("zero_output_for_mask", [False, True], ids=["carry", "zero"])
def test_parallel_matches_stepping(
    zero_output_for_mask, return_sequences, go_backwards, mask_kind, steps
):
    x = data(3, steps, seed=steps)
    mask = None if mask_kind is None else make_mask(mask_kind, 3, steps)
    options = dict(
        return_sequences=return_sequences,
        return_state=True,
        go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask,
    )
    layer = Aaren(2, 4, **options)
    parallel = layer(x, mask=mask)
    stepped = keras.layers.RNN(layer.cell, **options)(x, mask=mask)
    assert len(parallel) == len(stepped) == 3
    for name, got, want in zip(["output", "y", "c"], parallel, stepped):
        assert_close(got, want, what=name)


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("kind", ["aaren", "block"])
def test_stepping_in_either_spread_matches_parallel(kind, spread):
    # The cells' one-token step in the form the exports choose (`token_spread`) is the parallel
    # layer's, state included, from the zero state of a new stream (tests/ops/test_scan.py
    # steps both forms through scores far below its running max of 0).
    keras.utils.set_random_seed(5)
    x = data(3, 23, seed=5)
    options = dict(return_sequences=True, return_state=True)
    layer = Aaren(2, 4, **options) if kind == "aaren" else AarenBlock(2, 3, **options)
    parallel = layer(x)
    with token_spread(spread):
        stepped = keras.layers.RNN(layer.cell, **options)(x)
    for name, got, want in zip(["output", "y", "c"], parallel, stepped):
        assert_close(got, want, what=name)


def test_token_spread_is_scoped_and_checked():
    assert current_token_spread() == "broadcast"
    with token_spread("product"):
        assert current_token_spread() == "product"
    assert current_token_spread() == "broadcast"
    with pytest.raises(ValueError, match="`spread` must be one of"):
        with token_spread("gather"):
            pass


def test_initial_state_carries_over():
    x = data(2, 30, seed=1)
    layer = Aaren(3, 4, return_sequences=True, return_state=True)
    _, *state = layer(x[:, :12])
    parallel = layer(x[:, 12:], initial_state=state)
    stepped = keras.layers.RNN(layer.cell, return_sequences=True, return_state=True)(
        x[:, 12:], initial_state=state
    )
    for got, want in zip(parallel, stepped):
        assert_close(got, want)
    one_shot = layer(x)
    assert_close(parallel[0], to_numpy(one_shot[0])[:, 12:])
    for got, want in zip(parallel[1:], one_shot[1:]):
        assert_close(got, want)


@pytest.mark.parametrize("mask_kind", ["left", "holes"])
def test_initial_state_with_masked_leading_steps_matches_stepping(mask_kind):
    # Before the first real token of a call, keras.layers.RNN outputs what its backend's loop
    # outputs there (the incoming previous output on JAX, zeros elsewhere); so does the layer.
    x = data(3, 10, seed=2)
    mask = make_mask(mask_kind, 3, 10, seed=2)
    mask[:, 0] = False
    layer = Aaren(2, 4, return_sequences=True, return_state=True)
    _, *state = layer(data(3, 4, seed=3))
    parallel = layer(x, initial_state=state, mask=mask)
    stepped = keras.layers.RNN(layer.cell, return_sequences=True, return_state=True)(
        x, initial_state=state, mask=mask
    )
    for name, got, want in zip(["output", "y", "c"], parallel, stepped):
        assert_close(got, want, what=name)


def test_state_c_holds_the_papers_m_u_w():
    # c is documented as [m | u | w flattened]: check it against the paper's state written out in
    # numpy from the layer's weights, and check that unflatten_state gives (m, u, w) back.
    x = data(2, 17, seed=6, scale=3.0)
    layer = Aaren(2, 4, value_dim=3, return_state=True)
    _, _, c = layer(x)
    scores, values = numpy_projections(layer.cell, x)  # (B, T, H), (B, T, H, D)
    m = scores.max(axis=1)
    weights = np.exp(scores - m[:, None])
    u = weights.sum(axis=1)
    w = np.einsum("bth,bthd->bhd", weights, values)
    assert_close(c, np.concatenate([m, u, w.reshape(2, -1)], axis=-1), atol=5e-5, rtol=5e-5)
    for name, got, want in zip("muw", layer.cell.unflatten_state([c]), (m, u, w)):
        assert_close(got, want, atol=5e-5, rtol=5e-5, what=name)


def _stream(layer, x, sizes):
    outputs, start = [], 0
    for size in sizes:
        outputs.append(to_numpy(layer(x[:, start : start + size])))
        start += size
    return np.concatenate(outputs, axis=1)


@pytest.mark.parametrize("method", ["auto", "associative", "sequential"])
def test_stateful_chunks_equal_one_shot(method):
    x = data(2, 100, seed=2)
    one_shot = Aaren(2, 4, return_sequences=True, method=method)
    expected = to_numpy(one_shot(x))
    stateful = Aaren(2, 4, return_sequences=True, stateful=True, method=method)
    stateful.build((2, None, FEATURES))
    stateful.set_weights(one_shot.get_weights())
    assert_close(_stream(stateful, x, [1, 7, 64, 28]), expected)

    # reset_state() starts a new stream: the all-zero state means nothing seen.
    stateful.reset_state()
    assert_close(_stream(stateful, x, [50, 50]), expected)


@settings(max_examples=8, deadline=None)
@given(cuts=st.lists(st.integers(1, 39), min_size=0, max_size=5, unique=True))
def test_stateful_random_chunkings(cuts):
    x = data(2, 40, seed=3)
    bounds = [0, *sorted(cuts), 40]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    layer = Aaren(2, 3, return_sequences=True, stateful=True)
    layer.build((2, None, FEATURES))
    expected = to_numpy(keras.layers.RNN(layer.cell, return_sequences=True)(x))
    assert_close(_stream(layer, x, sizes), expected)


def test_stateful_predict_on_batch_continues_the_stream():
    # JAX's predict is a compiled stateless call that carries only the model's variables: the
    # stream continues only if the states are among them, and must still not be weights.
    x = data(2, 30, seed=5)
    one_shot = keras.Sequential([keras.Input((None, FEATURES)), Aaren(2, 4, return_sequences=True)])
    stateful = keras.Sequential(
        [
            keras.Input(batch_shape=(2, None, FEATURES)),
            Aaren(2, 4, return_sequences=True, stateful=True),
        ]
    )
    assert len(stateful.get_weights()) == len(one_shot.get_weights())
    stateful.set_weights(one_shot.get_weights())
    expected = to_numpy(one_shot(x))
    bounds = [(0, 1), (1, 12), (12, 30)]
    chunks = [stateful.predict_on_batch(x[:, a:b]) for a, b in bounds]
    assert_close(np.concatenate(chunks, axis=1), expected)
    reset_states(stateful)
    chunks = [stateful.predict(x[:, a:b], batch_size=2, verbose=0) for a, b in bounds]
    assert_close(np.concatenate(chunks, axis=1), expected)


def test_stateful_streaming_with_rnn_cell_matches_parallel():
    x = data(2, 20, seed=4)
    parallel = Aaren(2, 4, return_sequences=True)
    expected = to_numpy(parallel(x))
    streaming = keras.layers.RNN(parallel.cell, return_sequences=True, stateful=True)
    streaming.build((2, None, FEATURES))
    tokens = [to_numpy(streaming(x[:, t : t + 1]))[:, 0] for t in range(20)]
    assert_close(np.stack(tokens, axis=1), expected)


def test_gradients_match_stepping():
    # Gradients for the input and every weight, through a mask with holes and an empty row; the
    # weights go in as arguments of a stateless call, so every backend differentiates them.
    x = data(2, 17, seed=5)
    mask = make_mask("holes", 2, 17, seed=5)
    mask[0, 3] = True
    layer = Aaren(2, 4, return_sequences=True)
    layer.build((None, None, FEATURES))
    stepping = keras.layers.RNN(layer.cell, return_sequences=True)
    stepping.build((None, None, FEATURES))
    assert [id(v) for v in stepping.trainable_variables] == [
        id(v) for v in layer.trainable_variables
    ]
    weights = [to_numpy(v) for v in layer.trainable_variables]
    target = data(2, 17, seed=50)

    def loss_of(rnn):
        def loss(x, *trainable):
            # A tensor mask: Keras' PyTorch rnn loop calls `.type` on it.
            mask_tensor = keras.ops.convert_to_tensor(mask)
            outputs, _ = rnn.stateless_call(list(trainable), [], x, mask=mask_tensor)
            return keras.ops.sum(keras.ops.multiply(outputs, target))

        return loss

    got = gradients(loss_of(layer), [x, *weights])
    want = gradients(loss_of(stepping), [x, *weights])
    assert len(got) == len(want) == 1 + len(weights)
    for g, w in zip(got, want):
        # Nonzero: a call that read the variables instead of its arguments would give zeros.
        assert np.all(np.isfinite(g)) and np.any(g != 0)
        assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_input_gradients_match_oracle():
    x = data(2, 31, seed=6)
    layer = Aaren(2, 4, return_sequences=True)
    layer.build((None, None, FEATURES))
    stepping = keras.layers.RNN(layer.cell, return_sequences=True)
    got = gradients(lambda x: keras.ops.sum(layer(x) ** 2), [x])[0]
    want = gradients(lambda x: keras.ops.sum(stepping(x) ** 2), [x])[0]
    assert np.all(np.isfinite(got))
    assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask_kind", [None, "holes"])
def test_stacked_cells_match_stacked_layers(mask_kind):
    # With a mask, Keras' JAX loop outputs the last cell's first state at a masked step.
    x = data(3, 15, seed=7)
    mask = None if mask_kind is None else make_mask(mask_kind, 3, 15, seed=7)
    first = Aaren(2, 4, return_sequences=True)
    second = Aaren(3, 2, output_dim=5, return_sequences=True)
    expected = second(first(x, mask=mask), mask=mask)
    stacked = keras.layers.RNN(
        keras.layers.StackedRNNCells([first.cell, second.cell]), return_sequences=True
    )
    assert_close(stacked(x, mask=mask), expected)


def _model(layer_or_cell, steps=None):
    inputs = keras.Input((steps, FEATURES))
    if isinstance(layer_or_cell, AarenCell):
        hidden = keras.layers.RNN(layer_or_cell, return_sequences=True)(inputs)
    else:
        hidden = layer_or_cell(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def test_trained_weights_transfer_to_stepping_model():
    x = data(4, 12, seed=8)
    parallel = _model(Aaren(2, 4, return_sequences=True))
    parallel.compile("adam", "mse")
    parallel.fit(x, np.ones((4, 12, 1), "float32"), epochs=2, verbose=0)
    stepping = _model(AarenCell(2, 4, output_dim=FEATURES))
    assert [w.shape for w in stepping.weights] == [w.shape for w in parallel.weights]
    stepping.set_weights(parallel.get_weights())
    assert_close(stepping.predict(x, verbose=0), parallel.predict(x, verbose=0))


def test_keras_file_round_trip(tmp_path):
    x = data(3, 9, seed=9)
    inputs = keras.Input((None, FEATURES))
    hidden = Aaren(2, 4, return_sequences=True, method="associative", output_dim=8)(inputs)
    outputs = keras.layers.RNN(AarenCell(1, 3, output_dim=8))(hidden)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)
    layer = loaded.layers[1]
    assert isinstance(layer, Aaren)
    assert (layer.method, layer.output_dim, layer.num_heads) == ("associative", 8, 2)


@pytest.mark.parametrize("wrapper", ["aaren", "rnn"])
def test_compute_output_shape_before_build(wrapper):
    # As keras.layers.LSTM, an unbuilt layer answers from the input shape.
    if wrapper == "aaren":
        layer = Aaren(2, 4, return_sequences=True, return_state=True)
    else:
        cell = AarenCell(2, 4, output_dim=FEATURES)
        layer = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    assert layer.compute_output_shape((3, 7, FEATURES)) == (
        (3, 7, FEATURES),
        (3, FEATURES),
        (3, 2 + 2 + 2 * 4),
    )
    assert not layer.built


@pytest.mark.parametrize("method", METHODS)
def test_empty_sequence_names_the_time_axis(method):
    with pytest.raises(ValueError, match=r"at least one timestep \(axis 1, `timesteps`\)"):
        Aaren(2, 4, method=method)(np.zeros((2, 0, FEATURES), "float32"))
    layer = Aaren(2, 4, method=method)
    layer(data(2, 3))
    with pytest.raises(ValueError, match=r"Received: sequences.shape=\(2, 0, 6\)"):
        layer(np.zeros((2, 0, FEATURES), "float32"))


def test_config_round_trip():
    layer = Aaren(
        3,
        5,
        value_dim=7,
        output_dim=4,
        use_bias=False,
        method="chunked",
        stateful=True,
        return_state=True,
        go_backwards=True,
        kernel_regularizer="l2",
        query_constraint="non_neg",
    )
    clone = Aaren.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.value_dim, clone.use_bias, clone.go_backwards) == (7, False, True)
    cell = AarenCell(2, 3, output_dim=9)
    assert AarenCell.from_config(cell.get_config()).get_config() == cell.get_config()


def test_parameter_count_is_attention_plus_query():
    x = data(2, 5)
    layer = Aaren(4, 8)
    layer(x)
    attention = keras.layers.MultiHeadAttention(4, 8)
    attention(x, x)
    assert layer.count_params() == attention.count_params() + FEATURES


@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_functional_shapes_with_unknown_dims(return_sequences, return_state):
    inputs = keras.Input((None, FEATURES))
    layer = Aaren(
        2,
        4,
        value_dim=3,
        output_dim=7,
        return_sequences=return_sequences,
        return_state=return_state,
    )
    outputs = layer(inputs)
    outputs = outputs if return_state else [outputs]
    expected = [(None, None, 7) if return_sequences else (None, 7)]
    if return_state:
        expected += [(None, 7), (None, 2 + 2 + 2 * 3)]
    assert [tuple(o.shape) for o in outputs] == expected
    model = keras.Model(inputs, outputs)
    for steps in (1, 13):
        results = model(data(3, steps))
        results = results if isinstance(results, (list, tuple)) else [results]
        assert [tuple(r.shape) for r in results] == [
            tuple(
                3 if d is None and i == 0 else (steps if d is None else d) for i, d in enumerate(e)
            )
            for e in expected
        ]


@pytest.mark.parametrize("cell", ["aaren_cell", "block_cell", "stacked"])
def test_rnn_of_cell_of_unknown_width_names_what_to_pass(cell):
    # keras.layers.RNN copies the state sizes when constructed; a cell whose width follows its
    # input does not know them yet, and says so rather than let a state go missing.
    if cell == "aaren_cell":
        match = r"Pass `output_dim`.*Received: output_dim=None on an unbuilt cell"
        cells = AarenCell(2, 4)
    elif cell == "block_cell":
        match = r"Build the cell first \(`cell.build\(\(batch_size, width\)\)`\)"
        cells = AarenBlockCell(2, 4)
    else:
        match = "Pass `output_dim`"
        cells = [AarenCell(2, 4, output_dim=3), AarenCell(2, 4)]
    with pytest.raises(ValueError, match=match):
        keras.layers.RNN(cells)


@pytest.mark.parametrize(
    "wrapper",
    ["aaren", "rnn_with_output_dim", "rnn_of_built_cell", "bidirectional", "bidirectional_rnn"],
)
def test_functional_return_state_lists_every_state(wrapper):
    # The first state has the output's size, which with output_dim=None is the input width,
    # known only once the cell is built, while keras.layers.RNN copies the sizes when
    # constructed: every state must still come back, as LSTMCell's do.
    inputs = keras.Input((None, FEATURES))
    width = FEATURES
    if wrapper in ("aaren", "bidirectional"):
        layer = Aaren(2, 4, return_state=True)
    elif wrapper == "bidirectional_rnn":
        layer = keras.layers.RNN(AarenCell(2, 4, output_dim=FEATURES), return_state=True)
    elif wrapper == "rnn_with_output_dim":
        layer = keras.layers.RNN(AarenCell(2, 4, output_dim=5), return_state=True)
        width = 5
    else:
        cell = AarenCell(2, 4)
        cell.build((None, FEATURES))
        layer = keras.layers.RNN(cell, return_state=True)
    if wrapper.startswith("bidirectional"):
        outputs = keras.layers.Bidirectional(layer)(inputs)
        states = [(None, width), (None, 2 + 2 + 2 * 4)]
        expected = [(None, 2 * width), *states, *states]
        assert [tuple(o.shape) for o in outputs] == expected
        results = keras.Model(inputs, outputs)(data(3, 9))
        assert [tuple(r.shape) for r in results] == [(3,) + e[1:] for e in expected]
        return
    outputs = layer(inputs)
    expected = [(None, width), (None, width), (None, 2 + 2 + 2 * 4)]
    assert [tuple(o.shape) for o in outputs] == expected
    x = data(3, 9)
    results = keras.Model(inputs, outputs)(x)
    assert [tuple(r.shape) for r in results] == [(3,) + e[1:] for e in expected]
    # The previous-output state is the output itself.
    assert_close(results[1], results[0])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_in_a_compiled_model(method):
    # Graph mode hides shapes that eager calls know; keras.ops.associative_scan on TensorFlow
    # loses even the rank there.
    x = data(4, 20, seed=14)
    inputs = keras.Input((None, FEATURES))
    outputs = Aaren(2, 4, method=method, return_sequences=True)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(outputs))
    model.compile("adam", "mse")
    model.fit(x, np.zeros((4, 20, 1), "float32"), epochs=1, verbose=0)
    assert_close(model.predict(x, verbose=0), model(x), atol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_sequential_model_trains(jit_compile):
    skip_torch_jit_compile(jit_compile)
    x = data(32, 24, seed=10)
    # A target that needs attention over the sequence: the mean of the first feature so far.
    y = np.cumsum(x[..., :1], axis=1) / np.arange(1, 25)[None, :, None]
    model = keras.Sequential(
        [
            keras.Input((24, FEATURES)),
            Aaren(2, 8, return_sequences=True),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.5 * before


def test_functional_model_with_masking_trains():
    x = data(32, 20, seed=11)
    x[:8, 15:] = 0.0
    y = x[:, :, :2].sum(axis=1)
    inputs = keras.Input((None, FEATURES))
    hidden = keras.layers.Masking()(inputs)
    hidden = Aaren(2, 8, return_sequences=True)(hidden)
    outputs = keras.layers.Dense(2)(Aaren(2, 8)(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before


def test_reset_states_helper():
    model = keras.Sequential(
        [
            keras.Input(batch_shape=(2, None, FEATURES)),
            Aaren(2, 4, return_sequences=True, stateful=True),
            keras.layers.RNN(AarenCell(1, 2, output_dim=3), return_sequences=True, stateful=True),
        ]
    )
    x = data(2, 10, seed=13)
    first = to_numpy(model(x))
    assert not np.allclose(to_numpy(model(x)), first)
    assert reset_states(model) == 2
    assert_close(model(x), first)
    with pytest.raises(ValueError, match="`model` must be a keras.Model"):
        reset_states("not a model")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_heads": 0}, "`num_heads` must be a positive integer. Received: num_heads=0"),
        ({"key_dim": 0}, "`key_dim` must be a positive integer. Received: key_dim=0"),
        ({"key_dim": 2.5}, "Received: key_dim=2.5"),
        ({"value_dim": -1}, "`value_dim` must be a positive integer or None"),
        ({"output_dim": 0}, "`output_dim` must be a positive integer or None"),
        ({"method": "fast"}, "`method` must be one of .* Received: method='fast'"),
    ],
    ids=["num_heads", "key_dim", "key_dim_float", "value_dim", "output_dim", "method"],
)
def test_bad_arguments_raise(kwargs, match):
    arguments = {"num_heads": 2, "key_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        Aaren(**arguments)
    if "method" not in kwargs:
        with pytest.raises(ValueError, match=match):
            AarenCell(**arguments)


def test_bad_inputs_raise():
    layer = Aaren(2, 4)
    with pytest.raises(
        ValueError,
        match=r"\(batch_size, timesteps, features\).*Received: "
        r"sequences.shape=\(2, 6\)",
    ):
        layer(np.zeros((2, 6), "float32"))
    with pytest.raises(ValueError, match="known `features`"):
        Aaren(2, 4)(keras.Input((None, None)))
    with pytest.raises(ValueError, match="floating-point `inputs`.*Received: inputs.dtype=int32"):
        Aaren(2, 4)(np.zeros((2, 5, 3), "int32"))
    with pytest.raises(ValueError, match=r"`mask` must have shape.*Received: mask.shape=\(2, 4\)"):
        Aaren(2, 4)(data(2, 5), mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"`initial_state` as \[y, c\]"):
        Aaren(2, 4)(data(2, 5), initial_state=[np.zeros((2, 2), "float32")] * 3)
    # Four states in the (m, u, w) layout of the paper, [y, m, u, w], are refused, not misread.
    with pytest.raises(ValueError, match=r"`initial_state` as \[y, c\]"):
        Aaren(2, 4)(data(2, 5), initial_state=[np.zeros((2, n), "float32") for n in (3, 2, 2, 8)])
    with pytest.raises(
        ValueError,
        match=r"\(batch_size, features\).*Received: "
        r"input_shape=\(2, 5, 3\)",
    ):
        AarenCell(2, 4).build((2, 5, 3))
    with pytest.raises(ValueError, match="floating-point `inputs`"):
        keras.layers.RNN(AarenCell(2, 4, output_dim=3))(np.zeros((2, 5, 3), "int32"))


def test_model_on_50_lengths_keeps_a_bounded_number_of_programs():
    # Called eagerly on sequences of 50 lengths, a model compiles nothing on TensorFlow (eager
    # ops) and, on JAX, at most the limit of programs (one per length bucket and layer), however
    # many lengths it has seen; each output still equals stepping the same cells.
    from keras_aaren.ops import program_count, set_program_limit

    model = keras.Sequential(
        [keras.Input((None, FEATURES)), Aaren(2, 4, return_sequences=True), Aaren(1, 3)]
    )
    stepping = keras.Sequential(
        [
            keras.Input((None, FEATURES)),
            keras.layers.RNN(model.layers[0].cell, return_sequences=True),
            keras.layers.RNN(model.layers[1].cell),
        ]
    )
    on_jax = keras.backend.backend() == "jax"
    before = program_count()
    set_program_limit(3)
    try:
        for steps in range(3, 53):
            x = data(2, steps, seed=steps)
            outputs = model(x)
            assert program_count() <= 3 if on_jax else program_count() == before
            if steps in (3, 17, 52):
                assert_close(outputs, stepping(x), what=f"T={steps}")
        assert program_count() == (3 if on_jax else before)
    finally:
        set_program_limit(8)
