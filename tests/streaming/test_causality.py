"""keras_aaren.streaming.causality: which models stream, judged by what their layers do.

Refused models must name the layer, its class and the reason; accepted ones must stream token by
token to the parallel model's outputs, including users' own layers, whatever their class names.
"""

import keras
import numpy as np
import pytest
from helpers import assert_close, data, to_numpy
from streaming_models import BATCH, WIDTH

from keras_aaren import Aaren, AarenBlock, streaming
from keras_aaren.streaming.causality import ACTS_PER_TIMESTEP

layers = keras.layers


class CumulativeMean(layers.Layer):
    """A user's layer that mixes timesteps with keras.ops alone: the mean of the prefix."""

    def call(self, x):
        counts = keras.ops.arange(1, keras.ops.shape(x)[1] + 1, dtype=x.dtype)
        return keras.ops.cumsum(x, axis=1) / counts[:, None]


class Attention(layers.Dense):
    """A user's per-timestep gate that happens to share its class name with a Keras layer that
    mixes timesteps: the verdict must come from what it does."""

    def call(self, x):
        return x * keras.ops.sigmoid(super().call(x))


class ClosedDense(layers.Dense):
    """Per timestep in fact, but declared otherwise: the declaration wins."""

    acts_per_timestep = False


class MonteCarloDropout(layers.Dropout):
    """Dropout at inference too: per timestep, but random, so the probe cannot vouch for it."""

    def call(self, x, training=None):
        return super().call(x, training=True)


class DeclaredMonteCarloDropout(MonteCarloDropout):
    acts_per_timestep = True


class DeclaredConv1D(layers.Conv1D):
    """A subclass of a layer the probe refuses, declared per timestep by its author."""

    acts_per_timestep = True


# name: (the refused layer applied to a tensor, its class, the reason in the message).
REFUSED = {
    "bidirectional": (
        lambda x: layers.Bidirectional(layers.LSTM(2, return_sequences=True), name="suspect")(x),
        "Bidirectional",
        "mixes timesteps",
    ),
    "multi_head_attention": (
        lambda x: layers.MultiHeadAttention(2, 3, name="suspect")(x, x),
        "MultiHeadAttention",
        "mixes timesteps",
    ),
    "attention": (
        lambda x: layers.Attention(name="suspect")([x, x]),
        "Attention",
        "mixes timesteps",
    ),
    "global_pooling": (
        lambda x: layers.GlobalAveragePooling1D(name="suspect")(x),
        "GlobalAveragePooling1D",
        "does not keep the time axis",
    ),
    "pooling": (
        lambda x: layers.MaxPooling1D(2, name="suspect")(x),
        "MaxPooling1D",
        "does not keep the time axis",
    ),
    "flatten": (
        lambda x: layers.Flatten(name="suspect")(x),
        "Flatten",
        "does not keep the time axis",
    ),
    "conv_same": (
        lambda x: layers.Conv1D(2, 3, padding="same", name="suspect")(x),
        "Conv1D",
        "mixes timesteps",
    ),
    "conv_causal": (
        lambda x: layers.Conv1D(2, 3, padding="causal", name="suspect")(x),
        "Conv1D",
        "mixes timesteps",
    ),
    "lstm_backwards": (
        lambda x: layers.LSTM(2, go_backwards=True, return_sequences=True, name="suspect")(x),
        "LSTM",
        r"runs backwards over time \(go_backwards=True\)",
    ),
    "user_cumulative_mean": (
        lambda x: CumulativeMean(name="suspect")(x),
        "CumulativeMean",
        "mixes timesteps",
    ),
    "user_random_per_timestep": (
        lambda x: MonteCarloDropout(0.5, name="suspect")(x),
        "MonteCarloDropout",
        "mixes timesteps",
    ),
    "declared_not_per_timestep": (
        lambda x: ClosedDense(2, name="suspect")(x),
        "ClosedDense",
        "declares `acts_per_timestep = False`",
    ),
}


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_layers_that_do_not_act_per_timestep_are_refused(name, nested):
    apply, cls, reason = REFUSED[name]
    inputs = keras.Input((None, 3))
    hidden = layers.Dense(4)(inputs)
    if nested:
        inner_inputs = keras.Input((None, 4))
        inner = keras.Model(inner_inputs, apply(inner_inputs), name="inner")
        model, path = keras.Model(inputs, inner(hidden)), "inner/suspect"
    else:
        model, path = keras.Model(inputs, apply(hidden)), "suspect"
    message = f"Layer '{path}' \\({cls}\\) {reason}.*cannot be served token by token"
    with pytest.raises(ValueError, match=message):
        streaming.to_streaming(model, BATCH)
    with pytest.raises(ValueError, match=message):
        streaming.make_step_model(model, BATCH)


def _stream_tokens(model, x):
    stream = streaming.to_streaming(model, BATCH)
    return np.concatenate([to_numpy(stream(x[:, t : t + 1])) for t in range(x.shape[1])], 1)


def test_per_timestep_and_recurrent_layers_stream():
    # Every kind of layer that acts on each timestep alone, a user's own among them, between
    # recurrent layers of Keras and of keras_aaren.
    model = keras.Sequential(
        [
            keras.Input((None, 3)),
            layers.Dense(WIDTH),
            layers.LayerNormalization(),
            layers.Dropout(0.5),
            layers.TimeDistributed(layers.Dense(WIDTH)),
            layers.Conv1D(WIDTH, 1),
            Attention(WIDTH),
            layers.Masking(),
            layers.GRU(WIDTH, return_sequences=True),
            layers.LSTM(WIDTH, return_sequences=True),
            Aaren(2, 4, return_sequences=True),
            AarenBlock(2, 4, ffn_dim=16),
            layers.Dense(1),
        ]
    )
    x = data(BATCH, 7, 3, seed=10)
    assert_close(_stream_tokens(model, x), to_numpy(model(x)))


def test_embedding_of_integer_tokens_streams():
    inputs = keras.Input((None, 1), dtype="int32")
    hidden = layers.Reshape((-1, WIDTH))(layers.Embedding(10, WIDTH)(inputs))
    model = keras.Model(inputs, Aaren(2, 4, return_sequences=True)(hidden))
    tokens = np.random.default_rng(11).integers(0, 10, size=(BATCH, 6, 1)).astype("int32")
    assert_close(_stream_tokens(model, tokens), to_numpy(model(tokens)))


def test_layers_after_the_time_axis_is_gone_stream_whatever_they_do():
    # After an Aaren layer that returns its last output, each chunk yields one summary, as the
    # whole sequence does: a convolution over the summary's own axis is no longer over time.
    model = keras.Sequential(
        [
            keras.Input((None, 3)),
            Aaren(2, 4),
            layers.Reshape((3, 1)),
            layers.Conv1D(2, 2),
            layers.Flatten(),
        ]
    )
    x = data(BATCH, 9, 3, seed=12)
    stream = streaming.to_streaming(model, BATCH)
    last = [to_numpy(stream(x[:, a:b])) for a, b in [(0, 4), (4, 5), (5, 9)]][-1]
    assert_close(last, to_numpy(model(x)))


@pytest.mark.parametrize(
    "layer",
    [lambda: DeclaredMonteCarloDropout(0.5), lambda: DeclaredConv1D(3, 3, padding="causal")],
    ids=["random_per_timestep", "subclass_of_refused"],
)
def test_a_declaration_is_taken_at_its_word(layer):
    # Both are refused when undeclared (see REFUSED above); declared, the probe does not run.
    model = keras.Sequential([keras.Input((None, 3)), layer(), Aaren(1, 2)])
    assert getattr(model.layers[0], ACTS_PER_TIMESTEP) is True
    stream = streaming.to_streaming(model, BATCH)
    assert to_numpy(stream(data(BATCH, 2, 3, seed=13))).shape == (BATCH, 3)


def test_a_declaration_on_the_instance_overrides_the_class():
    dense = layers.Dense(2, name="suspect")
    dense.acts_per_timestep = False
    model = keras.Sequential([keras.Input((None, 3)), dense])
    with pytest.raises(ValueError, match=r"'suspect' \(Dense\) declares"):
        streaming.to_streaming(model, BATCH)
