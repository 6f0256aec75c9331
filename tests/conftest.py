import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402

# The folder of JAX's compilation cache that this process made for the test run, if any.
_JAX_CACHE_DIR = None


def pytest_configure(config):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Equivalence tests compare to ~1e-5; TF32 matmuls on GPUs would round to ~1e-3.
        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        _share_jax_compilations(config)


def _share_jax_compilations(config):
    """Compile each distinct XLA program once per test run, across tests and xdist workers.

    Many tests compile the same programs: Keras' JAX `keras.layers.RNN` builds a new loop on
    every eager call, and both workers build alike models. A compilation cache shared by the run
    (JAX's persistent cache, keyed by the program's fingerprint) reuses them. The controller (or
    a lone process) makes the folder and removes it at the end; workers and subprocesses find it
    in the environment.
    """
    import jax

    global _JAX_CACHE_DIR
    if not hasattr(config, "workerinput") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _JAX_CACHE_DIR = tempfile.mkdtemp(prefix="keras-aaren-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE_DIR
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # JAX read these variables when it was imported, before this hook ran.
    for option, kind in (
        ("jax_compilation_cache_dir", str),
        ("jax_persistent_cache_min_compile_time_secs", float),
        ("jax_persistent_cache_min_entry_size_bytes", int),
    ):
        value = os.environ.get(option.upper())
        if value is not None:
            jax.config.update(option, kind(value))


def pytest_unconfigure(config):
    if _JAX_CACHE_DIR is not None:
        shutil.rmtree(_JAX_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # The export docstrings run TensorFlow's SavedModel, LiteRT and ONNX converters, which exist
    # only there.
    if keras.backend.backend() != "tensorflow":
        skip = pytest.mark.skip(reason="the exports need the TensorFlow backend")
        for item in items:
            if item.name.startswith("keras_aaren.streaming.export."):
                item.add_marker(skip)
    # keras.distribution, and so ContextParallel's docstring, runs on JAX only.
    if keras.backend.backend() != "jax":
        skip = pytest.mark.skip(reason="keras.distribution runs on JAX only")
        for item in items:
            if item.name.startswith("keras_aaren.distribution."):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _float32_policy():
    # Mixed-precision tests set a global dtype policy; put it back for the next test.
    yield
    keras.config.set_dtype_policy("float32")
