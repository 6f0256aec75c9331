"""What keras_aaren relies on in Keras, JAX and TensorFlow beyond their documented API, in one
place, and why.

Everything else in the package uses documented API. Each item below is checked by
`tests/test_compat.py`, which fails with a message naming the change the day a release makes it.

Keras internals:

1. `DropoutRNNCell` (`keras/src/layers/rnn/dropout_rnn_cell.py`, not exported):
   `keras.layers.RNN` draws a cell's dropout masks once per call, outside its step loop, only for
   instances of this class, reading the cell's `dropout`, `recurrent_dropout`,
   `dropout_mask_count` and `seed_generator`. A cell that drew its masks inside the loop would,
   on JAX, advance a seed generator inside `jax.lax.scan` and leak its tracer. `AarenBlockCell`
   derives from it so that `keras.layers.RNN(block.cell)` drops as `LSTMCell` does; the block's
   parallel form draws its own masks (`AarenBlockCell.dropout_masks`).
2. `output_before_first_real_step`: what `keras.layers.RNN` outputs at a masked timestep before
   the first real one of a call. Its JAX step loop (`unroll=False`) outputs the cell's first
   state there, taking it for the previous output, while TensorFlow's and PyTorch's output
   zeros; the sequence layers give the same output as the loop of their backend.
3. `keras.layers.RNN.__init__` reads the cell's `state_size` and keeps a copy as the layer's
   `state_size`. An Aaren cell's output width, its first state's size, is the input's when
   `output_dim` is None, unknown until it is built; `ParallelRNN` lets the cell answer None
   while the constructor reads (`AttentionCell.width_pending`) and sets the layer's copy again
   in `build`.
4. A stateful `keras.layers.RNN` keeps its state in variables (`layer.states`) that are not
   among `layer.variables`, and Keras' JAX `predict`, `fit` and `evaluate` carry only a model's
   `variables` through their compiled stateless calls. `ParallelRNN.variables` adds the state
   variables, so that a stateful Aaren continues its stream across `predict_on_batch` calls
   on JAX.
5. `ContextParallel` extends `keras.distribution.ModelParallel` and overrides its properties
   `num_model_replicas` (one model replica per batch shard) and `batch_dim_name` (None when
   only time is split), and `distribute_dataset`. `ModelParallel`'s constructor reads
   `num_model_replicas`, so `ContextParallel` sets its own attributes before calling it.
6. `_keras_mask`: Keras attaches the mask a layer passes on to its symbolic output as the
   attribute `_keras_mask` (as its masking guide shows); `make_step_model` reads it to refuse
   a model whose layers pass masks, which the one-token step cannot take.
7. `keras.layers.LayerNormalization` keeps its constructor arguments `epsilon`, `center` and
   `scale` as attributes of those names and its weights as `gamma` and `beta`, and computes
   `(x - mean) / sqrt(variance + epsilon) * gamma + beta` over the last axis. The one-token step
   of `AarenBlockCell` computes its LayerNormalizations from them, as the ops that ONNX Runtime
   fuses into one (`layers.aaren_block._token_layer_norm`), where calling the layer would
   export Keras' dozen smaller ops.

Keras behaviour the package works around:

8. Keras' type promotion follows JAX's default of 32-bit types on the backends other than
   TensorFlow: on PyTorch, `keras.ops.matmul` and `keras.ops.maximum` compute two float64
   tensors in float32, and `keras.ops.where` converts a Python float through float32 (float64's
   minimum becomes -inf). `ops.backend.matmul` (an `einsum` there), `ops.recurrence.larger` (a
   selection for float64 there) and `ops.recurrence.lowest` (no lower than float32's minimum)
   keep float64 end to end.
9. `keras.ops.associative_scan` on PyTorch interleaves its partial results in torch's default
   dtype, float32, whatever the inputs' dtype: `method="associative"` on PyTorch is exact to
   float32 rounding for float64 inputs. The default method, `"chunked"`, does not use it.

JAX:

10. `jax.core.Tracer`: the class of every value a JAX transformation traces. The scan and the
    layers test for it to tell an eager call on JAX (which runs as a cached compiled program,
    `ops.backend.ProgramCache`) from one inside a caller's trace.
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
