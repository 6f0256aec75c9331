"""The models that the streaming tests serve, and the sizes they share."""

import keras

from keras_aaren import Aaren, AarenBlock, AarenCell

BATCH = 2
WIDTH = 8
STEPS = 24


def sequential_blocks():
    return keras.Sequential(
        [
            keras.Input((None, 3)),
            keras.layers.Dense(WIDTH),
            AarenBlock(2, 4, ffn_dim=16),
            AarenBlock(2, 4, ffn_dim=16, norm_first=True),
            keras.layers.Dense(1),
        ]
    )


def functional_mixed():
    # A residual connection around an Aaren layer, a stepped AarenCell and an LSTM: streaming
    # must handle any causal graph, not only stacks.
    inputs = keras.Input((None, 3))
    hidden = keras.layers.Dense(WIDTH)(inputs)
    block = AarenBlock(2, 4, ffn_dim=16)(hidden)
    hidden = keras.layers.Add()([hidden, Aaren(2, 4, return_sequences=True)(block)])
    hidden = keras.layers.RNN(AarenCell(1, 2, output_dim=WIDTH), return_sequences=True)(hidden)
    outputs = keras.layers.Dense(1)(keras.layers.LSTM(4, return_sequences=True)(hidden))
    return keras.Model(inputs, outputs)


MODELS = {"sequential_blocks": sequential_blocks, "functional_mixed": functional_mixed}


def every_recurrent_kind():
    # Keras' recurrent layers (GRU and SimpleRNN with one state, an LSTM whose final states feed
    # the head), a stack of an Aaren cell and an LSTM cell in one RNN, and an Aaren layer that
    # returns its last output only; per-timestep layers between them see (batch, 1, features) in
    # the step, the head sees (batch, features).
    layers = keras.layers
    inputs = keras.Input((None, 3))
    hidden = layers.LayerNormalization()(layers.Dense(WIDTH)(inputs))
    hidden = layers.TimeDistributed(layers.Dense(WIDTH))(hidden)
    hidden = layers.Conv1D(WIDTH, 1)(layers.GRU(WIDTH, return_sequences=True)(hidden))
    hidden = layers.SimpleRNN(WIDTH, return_sequences=True)(hidden)
    stack = layers.StackedRNNCells([AarenCell(2, 4, output_dim=WIDTH), layers.LSTMCell(WIDTH)])
    hidden = layers.RNN(stack, return_sequences=True)(hidden)
    hidden, last_h, _ = layers.LSTM(WIDTH, return_sequences=True, return_state=True)(hidden)
    head = layers.Concatenate()([Aaren(2, 4)(hidden), last_h])
    return keras.Model(inputs, layers.Dense(4)(head))


def prefix_outputs(model, x, tokens):
    """The parallel model's output on each prefix `x[:, : t + 1]`, for `t` in `tokens`."""
    return [keras.ops.convert_to_numpy(model(x[:, : t + 1])) for t in tokens]
