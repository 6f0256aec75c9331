import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Equivalence tests compare to ~1e-5; TF32 matmuls on GPUs would round to ~1e-3.
        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    # The export docstrings run TensorFlow's SavedModel and TFLite tools, which exist only there.
    if keras.backend.backend() != "tensorflow":
        skip = pytest.mark.skip(reason="SavedModel and TFLite export need the TensorFlow backend")
        for item in items:
            if item.name.startswith("keras_aaren.streaming.export_"):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _float32_policy():
    # Mixed-precision tests set a global dtype policy; put it back for the next test.
    yield
    keras.config.set_dtype_policy("float32")
