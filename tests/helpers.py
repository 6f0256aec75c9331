"""Small test helpers: backend-neutral gradients, numpy conversion, RNG data, and a JAX process
with several virtual CPU devices."""

import functools

import keras
import numpy as np
import pytest

from keras_aaren.ops import aaren_attention_naive


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def gradients(fn, inputs, constants=()):
    """Gradients of the scalar `fn(*inputs, *constants)` with respect to each of `inputs`.

    On JAX the gradient runs as one `jax.jit` program, cached per `fn`: `jax.grad` outside a
    jit dispatches and compiles every primitive of the scan on its own, for every new shape.
    Pass the data that is not differentiated as `constants`, so a stable
    `fn` compiles once per shape and not once per test.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            loss = fn(*tensors, *constants)
        return [to_numpy(g) for g in tape.gradient(loss, tensors)]
    if backend == "jax":
        return [np.asarray(g) for g in _jax_gradient(fn, len(inputs))(*inputs, *constants)]
    if backend == "torch":
        import torch

        tensors = [torch.tensor(x, requires_grad=True) for x in inputs]
        fn(*tensors, *constants).backward()
        return [t.grad.numpy() for t in tensors]
    raise NotImplementedError(f"no gradient helper for backend {backend}")


@functools.cache
def _jax_gradient(fn, count):
    import jax

    return jax.jit(jax.grad(fn, argnums=tuple(range(count))))


def naive_attention(scores, values, initial_state=None, mask=None):
    """`aaren_attention_naive`, on JAX as one `jax.jit` program per shape.

    Called eagerly on JAX, the oracle's few dozen ops each compile for every new shape, several
    times the cost of compiling one program, which adds up over property tests of random shapes.
    """
    if keras.backend.backend() == "jax":
        return _jax_naive()(scores, values, initial_state, mask)
    return aaren_attention_naive(scores, values, initial_state, mask)


@functools.cache
def _jax_naive():
    import jax

    return jax.jit(aaren_attention_naive)


def assert_close(actual, expected, atol=2e-5, rtol=2e-5, what=""):
    np.testing.assert_allclose(
        to_numpy(actual), to_numpy(expected), atol=atol, rtol=rtol, err_msg=what
    )


FEATURES = 6


def data(batch, steps, features=FEATURES, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=(batch, steps, features))).astype("float32")


def make_mask(kind, batch, steps, seed=0):
    """A (batch, steps) mask: left or right padding of a third, or holes and an empty row."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, steps), dtype=bool)
    cut = max(1, steps // 3)
    if kind == "left":
        mask[:, :cut] = False
    elif kind == "right":
        mask[:, steps - cut :] = False
    elif kind == "holes":
        mask = rng.random((batch, steps)) > 0.4
        mask[0] = False
    return mask


def numpy_projections(cell, x):
    """An AarenCell's scores (B, T, H) and values (B, T, H, D), computed in float64 numpy."""
    w = {
        name: to_numpy(getattr(cell, name)).astype("float64")
        for name in (
            "query",
            "query_kernel",
            "query_bias",
            "key_kernel",
            "key_bias",
            "value_kernel",
            "value_bias",
        )
    }
    x = np.asarray(x, "float64")
    query = np.einsum("f,fhk->hk", w["query"], w["query_kernel"]) + w["query_bias"]
    keys = np.einsum("btf,fhk->bthk", x, w["key_kernel"]) + w["key_bias"]
    values = np.einsum("btf,fhd->bthd", x, w["value_kernel"]) + w["value_bias"]
    scores = np.einsum("bthk,hk->bth", keys, query) / np.sqrt(cell.key_dim)
    return scores, values


def numpy_output(cell, attended):
    """An AarenCell's output projection of attended values (B, T, H, D), in float64 numpy."""
    kernel = to_numpy(cell.output_kernel).astype("float64")
    return np.einsum("bthd,hdo->bto", attended, kernel) + to_numpy(cell.output_bias)


def skip_torch_jit_compile(jit_compile):
    """Skips a `jit_compile=True` case on PyTorch, where Keras compiles with `torch.compile`.

    Keras documents that path as experimental; it spends minutes tracing the scan of one small
    fit, and no XLA kernel exists there to test.
    """
    if jit_compile and keras.backend.backend() == "torch":
        pytest.skip("jit_compile on PyTorch is Keras' experimental torch.compile path")


def run_on_cpu_devices(script, devices, *args):
    """The JSON that `script` prints last, run with `args` in a JAX process of `devices` virtual
    CPU devices: a subprocess, because the devices must be set up before JAX starts."""
    import json
    import os
    import subprocess
    import sys

    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    environment = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": flags.strip(),
    }
    result = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
