"""keras_aaren.compat: what the package relies on in Keras beyond its exported API still holds.

Each test names the Keras behaviour it checks, so that a failure after a Keras release says what
changed and where `keras_aaren/compat.py` must follow.
"""

import keras
import numpy as np
from helpers import to_numpy

from keras_aaren import AarenBlockCell, compat


def test_dropout_rnn_cell_is_the_class_keras_rnn_draws_masks_for():
    # keras.layers.RNN draws a cell's dropout masks before its loop only for instances of this
    # class; its own LSTMCell derives from it.
    assert issubclass(keras.layers.LSTMCell, compat.DropoutRNNCell), (
        "Keras' LSTMCell no longer derives from keras_aaren.compat.DropoutRNNCell: Keras has "
        "changed how keras.layers.RNN draws dropout masks; AarenBlockCell must follow."
    )
    for method in ("get_dropout_mask", "reset_dropout_mask"):
        assert hasattr(compat.DropoutRNNCell, method), f"DropoutRNNCell lost `{method}`"
    assert issubclass(AarenBlockCell, compat.DropoutRNNCell)


def test_rnn_drops_the_same_mask_at_every_step_of_a_call():
    # The masks are drawn once per call (the block's documented dropout): a cell that passes
    # its input through its mask shows the same zeros at every step.
    class Masked(compat.DropoutRNNCell, keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.state_size = 4
            self.dropout, self.recurrent_dropout = 0.5, 0.0
            self.seed_generator = keras.random.SeedGenerator(1)

        def call(self, inputs, states, training=False):
            mask = self.get_dropout_mask(inputs) if training else 1.0
            return inputs * mask, states

    x = np.ones((2, 5, 4), "float32")
    outputs = to_numpy(keras.layers.RNN(Masked(), return_sequences=True)(x, training=True))
    assert np.any(outputs == 0), "no dropout happened"
    for t in range(1, 5):
        np.testing.assert_array_equal(outputs[:, t] == 0, outputs[:, 0] == 0)


def test_output_before_first_real_step_is_what_keras_rnn_outputs():
    # A masked step before any real one of the call, after an initial state: Keras' JAX loop
    # outputs the cell's first state there, the other backends zeros.
    cell = keras.layers.SimpleRNNCell(3)
    previous = np.full((2, 3), 0.5, "float32")
    mask = np.array([[False, True], [False, False]])
    x = np.ones((2, 2, 4), "float32")
    outputs = keras.layers.RNN(cell, return_sequences=True)(x, initial_state=[previous], mask=mask)
    expected = to_numpy(compat.output_before_first_real_step(keras.ops.convert_to_tensor(previous)))
    np.testing.assert_allclose(
        to_numpy(outputs)[:, 0],
        expected,
        err_msg=(
            "keras.layers.RNN no longer outputs what keras_aaren.compat."
            "output_before_first_real_step says at a leading masked step on "
            f"{keras.backend.backend()}"
        ),
    )
