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
