"""AarenBlock and AarenBlockCell: parallel block vs stepping its cell, stacking, parameter count,
saving, training and bad input."""

import keras
import numpy as np
import pytest
from helpers import (
    assert_close,
    data,
    make_mask,
    skip_torch_jit_compile,
    to_numpy,
)

from keras_aaren import AarenBlock, AarenBlockCell, reset_states

WIDTH = 16


def block(**kwargs):
    options = dict(num_heads=4, key_dim=4, ffn_dim=24)
    options.update(kwargs)
    return AarenBlock(**options)


@pytest.mark.parametrize("mask_kind", [None, "left", "right", "holes"])
@pytest.mark.parametrize("return_sequences", [True, False], ids=["seq", "last"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_block_matches_stepping(norm_first, return_sequences, mask_kind):
    x = data(3, 29, WIDTH, seed=1)
    mask = None if mask_kind is None else make_mask(mask_kind, 3, 29, seed=1)
    options = dict(return_sequences=return_sequences, return_state=True)
    layer = block(norm_first=norm_first, dropout=0.1, **options)
    parallel = layer(x, mask=mask)
    stepped = keras.layers.RNN(layer.cell, **options)(x, mask=mask)
    assert len(parallel) == len(stepped) == 3
    for name, got, want in zip(["output", "y", "c"], parallel, stepped):
        assert_close(got, want, what=name)


@pytest.mark.parametrize("go_backwards", [False, True], ids=["forward", "backward"])
def test_block_zero_output_and_backwards(go_backwards):
    x = data(2, 17, WIDTH, seed=2)
    mask = make_mask("holes", 2, 17, seed=2)
    options = dict(go_backwards=go_backwards, zero_output_for_mask=True)
    layer = block(**options)
    assert_close(
        layer(x, mask=mask),
        keras.layers.RNN(layer.cell, return_sequences=True, **options)(x, mask=mask),
    )


def test_block_without_attention_mixing_is_pointwise():
    # An independent check of the block's wiring: with one token, Aaren's output is the
    # projection of that token's value, so the block is a plain per-token computation.
    x = data(2, 1, WIDTH, seed=3)
    layer = block(use_bias=True)
    y = to_numpy(layer(x))[:, 0]
    cell = layer.cell
    attention = cell.attention
    x0 = x[:, 0].astype("float64")
    values = np.einsum("bf,fhd->bhd", x0, to_numpy(attention.value_kernel)) + to_numpy(
        attention.value_bias
    )
    attended = np.einsum("bhd,hdo->bo", values, to_numpy(attention.output_kernel)) + to_numpy(
        attention.output_bias
    )

    def norm(layer_norm, z):
        mean = z.mean(-1, keepdims=True)
        var = z.var(-1, keepdims=True)
        gamma, beta = (to_numpy(w) for w in layer_norm.weights)
        return (z - mean) / np.sqrt(var + layer_norm.epsilon) * gamma + beta

    def dense(layer_dense, z):
        kernel, bias = (to_numpy(w) for w in layer_dense.weights)
        return z @ kernel + bias

    h = norm(cell.attention_norm, x0 + attended)
    ffn = dense(cell.ffn_output, np.maximum(dense(cell.ffn_intermediate, h), 0.0))
    assert_close(y, norm(cell.ffn_norm, h + ffn), atol=1e-4, rtol=1e-4)


def test_blocks_stack_and_stream():
    x = data(2, 40, WIDTH, seed=4)
    model = keras.Sequential(
        [
            keras.Input((None, WIDTH)),
            block(),
            block(norm_first=True),
            keras.layers.Dense(1),
        ]
    )
    expected = to_numpy(model(x))
    streaming = keras.Sequential(
        [
            keras.Input(batch_shape=(2, None, WIDTH)),
            keras.layers.RNN(model.layers[0].cell, return_sequences=True, stateful=True),
            keras.layers.RNN(model.layers[1].cell, return_sequences=True, stateful=True),
            model.layers[2],
        ]
    )
    # The first 12 tokens, one call each: on JAX every eager call of keras.layers.RNN compiles
    # its loop again (docs/backends.md), so every token costs a compilation. The outputs are
    # causal, so a prefix of the stream must equal the same prefix of the parallel output.
    tokens = [to_numpy(streaming(x[:, t : t + 1])) for t in range(12)]
    assert_close(np.concatenate(tokens, axis=1), expected[:, :12])
    stateful = block(stateful=True)
    stateful.build((2, None, WIDTH))
    stateful.set_weights(model.layers[0].get_weights())
    chunks = [to_numpy(stateful(x[:, a:b])) for a, b in [(0, 1), (1, 8), (8, 40)]]
    assert_close(np.concatenate(chunks, axis=1), to_numpy(model.layers[0](x)))
    assert (
        reset_states(keras.Sequential([keras.Input(batch_shape=(2, None, WIDTH)), stateful])) == 1
    )


def test_parameter_count_is_transformer_block_plus_query():
    x = data(2, 5, WIDTH)
    layer = block()
    layer(x)
    attention = keras.layers.MultiHeadAttention(4, 4)
    attention(x, x)
    norms = 2 * 2 * WIDTH
    ffn = (WIDTH * 24 + 24) + (24 * WIDTH + WIDTH)
    assert layer.count_params() == attention.count_params() + norms + ffn + WIDTH


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_block_trains_with_masking(jit_compile):
    skip_torch_jit_compile(jit_compile)
    x = data(32, 20, WIDTH, seed=5)
    x[:8, 14:] = 0.0
    y = np.cumsum(x[..., :1], axis=1) / np.arange(1, 21)[None, :, None]
    model = keras.Sequential(
        [
            keras.Input((20, WIDTH)),
            keras.layers.Masking(),
            block(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=10, batch_size=16, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before


def test_block_cell_dropout_trains_in_keras_rnn():
    # keras.layers.RNN draws the step's dropout masks before its loop, as for LSTMCell: drawing
    # them inside the loop leaks a tracer on JAX.
    x, y = data(8, 11, WIDTH, seed=2), data(8, 11, 1, seed=3)
    cell = AarenBlockCell(2, 4, ffn_dim=8, dropout=0.5, seed=3)
    cell.build((None, WIDTH))
    rnn = keras.layers.RNN(cell, return_sequences=True)
    model = keras.Sequential([keras.Input((11, WIDTH)), rnn, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    history = model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    trained, inferred = to_numpy(rnn(x, training=True)), to_numpy(rnn(x, training=False))
    assert np.all(np.isfinite(trained))
    assert not np.allclose(trained, inferred)


@pytest.mark.parametrize("other", ["sequential", "associative", "stepped"])
def test_block_dropout_is_the_same_whatever_the_method(other):
    # One mask per sequence, drawn from the cell's seed generator before the tokens are seen:
    # the parallel block, its step loop and keras.layers.RNN over its cell drop alike.
    x = data(3, 9, WIDTH, seed=4)
    mask = make_mask("holes", 3, 9, seed=4)
    mask[0, 0] = True
    parallel = AarenBlock(2, 4, ffn_dim=8, dropout=0.5, seed=5)
    inferred = parallel(x, mask=mask)
    if other == "stepped":
        twin = AarenBlock(2, 4, ffn_dim=8, dropout=0.5, seed=5)
        twin(x)
        twin.set_weights(parallel.get_weights())
        layer = keras.layers.RNN(twin.cell, return_sequences=True)
    else:
        layer = AarenBlock(2, 4, ffn_dim=8, dropout=0.5, seed=5, method=other)
        # Built, not called: keras.layers.RNN's step loop draws masks even at inference.
        layer.build(x.shape)
        layer.set_weights(parallel.get_weights())
    expected = parallel(x, mask=mask, training=True)
    got = layer(x, mask=mask, training=True)
    assert_close(got, expected)
    assert not np.allclose(to_numpy(expected), to_numpy(inferred))


def test_block_empty_sequence_names_the_time_axis():
    with pytest.raises(ValueError, match=r"at least one timestep \(axis 1, `timesteps`\)"):
        block()(np.zeros((2, 0, WIDTH), "float32"))


def test_block_keras_file_round_trip(tmp_path):
    x = data(2, 9, WIDTH, seed=6)
    model = keras.Sequential(
        [
            keras.Input((None, WIDTH)),
            block(norm_first=True, activation="gelu", dropout=0.2, kernel_regularizer="l2"),
            block(return_sequences=False, method="associative"),
        ]
    )
    path = str(tmp_path / "blocks.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)
    assert loaded.layers[0].get_config() == model.layers[0].get_config()
    cell = AarenBlockCell(2, 3, ffn_dim=5)
    assert AarenBlockCell.from_config(cell.get_config()).get_config() == cell.get_config()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_heads": 0}, "`num_heads` must be a positive integer"),
        ({"key_dim": None}, "`key_dim` must be a positive integer. Received: key_dim=None"),
        ({"ffn_dim": 0}, "`ffn_dim` must be a positive integer or None"),
        ({"dropout": 1.0}, r"`dropout` must be a float in \[0, 1\). Received: dropout=1.0"),
        ({"method": "scan"}, "`method` must be one of"),
    ],
    ids=["num_heads", "key_dim", "ffn_dim", "dropout", "method"],
)
def test_block_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        block(**kwargs)


def test_block_bad_inputs():
    with pytest.raises(ValueError, match=r"Received: sequences.shape=\(2, 16\)"):
        block()(np.zeros((2, WIDTH), "float32"))
    with pytest.raises(ValueError, match="floating-point `inputs`"):
        block()(np.zeros((2, 3, WIDTH), "int32"))
