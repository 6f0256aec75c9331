"""What keras_aaren relies on in Keras beyond its exported API, in one place, and why.

Everything else in the package uses Keras' public API. Each item here is checked by
`tests/test_compat.py`, which fails with a message naming the Keras change the day a release
moves or changes it.

* `DropoutRNNCell`: `keras.layers.RNN` draws a cell's dropout masks once per call, outside its
  step loop, only for cells that derive from this class (`isinstance`), which Keras does not
  export. A cell that drew its masks inside the loop would, on JAX, advance a seed generator
  inside `jax.lax.scan` and leak its tracer; `AarenBlockCell` derives from it so that its step
  form draws its masks as `LSTMCell` does, and its parallel form reads the same masks.
* `output_before_first_real_step`: what `keras.layers.RNN` outputs at a masked timestep before
  the first real one of a call. Its JAX step loop (`unroll=False`) outputs the cell's first
  state there, taking it for the previous output, while TensorFlow's and PyTorch's output
  zeros; `ParallelRNN` gives the same output as the loop of its backend.
"""

import keras

try:
    from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
except ImportError as error:  # pragma: no cover - depends on the Keras release
    raise ImportError(
        "keras_aaren needs Keras' DropoutRNNCell (keras/src/layers/rnn/dropout_rnn_cell.py), "
        "the class keras.layers.RNN draws a cell's dropout masks for, and this Keras release "
        f"does not have it there (Keras {keras.version()}). Please report it to keras_aaren."
    ) from error

__all__ = ["DropoutRNNCell", "output_before_first_real_step"]


def output_before_first_real_step(previous_output):
    """The output of `keras.layers.RNN` at a masked timestep before any real one of the call.

    Args:
        previous_output: tensor `(batch_size, output_size)`, the cell's first incoming state.

    Returns:
        `previous_output` on JAX, zeros of its shape on the other backends.
    """
    if keras.backend.backend() == "jax":
        return previous_output
    return keras.ops.zeros_like(previous_output)
