"""keras_aaren.compat: what the package relies on in Keras and JAX beyond their documented API
still holds.

Each test names the Keras behaviour it checks, so that a failure after a Keras release says what
changed and where `keras_aaren/compat.py` must follow.
"""

import keras
import numpy as np
import pytest
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


def test_dropout_rnn_cell_draws_as_many_masks_as_dropout_mask_count():
    # AarenBlockCell asks for two masks per call through this attribute.
    class Two(compat.DropoutRNNCell):
        dropout, recurrent_dropout, dropout_mask_count = 0.5, 0.0, 2
        seed_generator = keras.random.SeedGenerator(3)

    masks = Two().get_dropout_mask(np.ones((2, 4), "float32"))
    assert isinstance(masks, (list, tuple)) and len(masks) == 2, (
        "DropoutRNNCell.get_dropout_mask no longer draws `dropout_mask_count` masks; "
        "AarenBlockCell's step form must follow."
    )


def test_rnn_reads_and_copies_the_cells_state_size_when_constructed():
    # ParallelRNN lets the cell leave its first state's size open while this happens.
    reads = []

    class Cell(keras.layers.Layer):
        @property
        def state_size(self):
            reads.append(True)
            return [None, 3]

        def call(self, inputs, states):
            return inputs, states

    layer = keras.layers.RNN(Cell())
    assert reads, (
        "keras.layers.RNN no longer reads `cell.state_size` when constructed; "
        "AttentionCell.width_pending can go."
    )
    assert list(layer.state_size) == [None, 3], (
        "keras.layers.RNN no longer keeps a copy of the cell's state sizes as `state_size`; "
        "ParallelRNN.build must follow."
    )


def test_stateful_rnn_state_variables_are_not_among_its_variables():
    # ParallelRNN.variables lists them, so that JAX's compiled predict carries the stream.
    layer = keras.layers.LSTM(2, stateful=True)
    layer.build((3, 4, 5))
    assert layer.states is not None and len(layer.states) == 2
    listed = {id(v) for v in layer.variables}
    assert not any(id(v) in listed for v in layer.states), (
        "keras.layers.RNN now lists a stateful layer's state variables among its variables; "
        "ParallelRNN.variables need not add them."
    )


def test_model_parallel_reads_the_properties_context_parallel_overrides():
    # `num_model_replicas` is ModelParallel's from Keras 3.15 on; Keras 3.14 has none to
    # override.
    names = ["batch_dim_name"]
    if hasattr(keras.distribution.ModelParallel, "num_model_replicas"):
        names.append("num_model_replicas")
    for name in names:
        assert isinstance(getattr(keras.distribution.ModelParallel, name, None), property), (
            f"keras.distribution.ModelParallel.{name} is no longer a property; "
            "keras_aaren.distribution.ContextParallel overrides it."
        )
    assert callable(getattr(keras.distribution.ModelParallel, "distribute_dataset", None))


def test_a_layer_passes_its_mask_on_as_keras_mask():
    # make_step_model refuses a model whose layers pass masks by reading this attribute.
    outputs = keras.layers.Masking()(keras.Input((None, 3)))
    assert getattr(outputs, "_keras_mask", None) is not None, (
        "Keras no longer attaches a layer's output mask as `_keras_mask`; "
        "keras_aaren.streaming.convert._check_no_mask must follow."
    )


def test_layer_normalization_computes_from_the_attributes_the_token_step_reads():
    # AarenBlockCell's one-token step normalizes from these attributes, written out as the ops
    # ONNX Runtime fuses (keras_aaren.layers.aaren_block._token_layer_norm).
    layer = keras.layers.LayerNormalization(epsilon=1e-3)
    x = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    layer.build(x.shape)
    layer.set_weights([np.linspace(0.5, 2.0, 8), np.linspace(-1.0, 1.0, 8)])
    for name in ("epsilon", "center", "scale", "gamma", "beta"):
        assert hasattr(layer, name), (
            f"keras.layers.LayerNormalization has no attribute `{name}` now; "
            "keras_aaren.layers.aaren_block._token_layer_norm must follow."
        )
    assert (layer.epsilon, layer.center, layer.scale) == (1e-3, True, True)
    centered = x - x.mean(axis=-1, keepdims=True)
    variance = (centered**2).mean(axis=-1, keepdims=True)
    gamma, beta = to_numpy(layer.gamma), to_numpy(layer.beta)
    expected = centered / np.sqrt(variance + layer.epsilon) * gamma + beta
    np.testing.assert_allclose(
        to_numpy(layer(x)),
        expected,
        rtol=1e-5,
        atol=1e-5,
        err_msg="keras.layers.LayerNormalization no longer computes (x - mean) / "
        "sqrt(variance + epsilon) * gamma + beta; keras_aaren.layers.aaren_block."
        "_token_layer_norm must follow.",
    )


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's type promotion")
def test_keras_computes_float64_matmul_and_maximum_in_float32_on_torch():
    x = keras.ops.convert_to_tensor(np.full((2, 2), 1.0 + 2.0**-40))
    for name, result in (
        ("matmul", keras.ops.matmul(x, x)),
        ("maximum", keras.ops.maximum(x, x)),
    ):
        assert keras.backend.standardize_dtype(result.dtype) == "float32", (
            f"keras.ops.{name} now keeps float64 on PyTorch; keras_aaren.ops.backend.matmul and "
            "keras_aaren.ops.recurrence.larger can use Keras' ops again."
        )


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's associative_scan")
def test_keras_associative_scan_interleaves_in_float32_on_torch():
    x = np.full((9,), 1.0 + 2.0**-40)
    result = keras.ops.associative_scan(lambda a, b: a + b, keras.ops.convert_to_tensor(x))
    assert not np.allclose(to_numpy(result), np.cumsum(x), rtol=1e-13, atol=0), (
        "keras.ops.associative_scan keeps float64 on PyTorch now; remove the xfail of "
        "tests/test_float64.py and item 9 of keras_aaren.compat."
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's traced values")
def test_jax_traced_values_are_jax_core_tracers():
    import jax

    seen = []

    def f(x):
        seen.append(isinstance(x, jax.core.Tracer))
        return x

    jax.jit(f)(np.ones(2, "float32"))
    assert seen == [True], (
        "jax.core.Tracer is no longer the class of traced values; "
        "keras_aaren.ops.backend.runs_eagerly_on_jax must follow."
    )
    assert not isinstance(jax.numpy.ones(2), jax.core.Tracer)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's type promotion")
def test_keras_where_takes_a_python_float_through_float32_on_torch():
    x = keras.ops.convert_to_tensor(np.array([1.0, -1.0]))
    result = to_numpy(keras.ops.where(x > 0, x, float(np.finfo("float64").min)))
    assert np.isinf(result[1]), (
        "keras.ops.where keeps a Python float64 as float64 on PyTorch now; "
        "keras_aaren.ops.recurrence.lowest may return float64's minimum again."
    )
