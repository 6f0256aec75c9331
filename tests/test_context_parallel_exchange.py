"""Under `keras_aaren.distribution.ContextParallel`, what the devices exchange does not grow with
the sequence, and each device holds a share of the memory.

Read from XLA's compiled forward and backward program of one `Aaren` layer (batch 8, 4 heads of
16) with the time axis split across 4 virtual CPU devices, at two lengths, beside the same
program on one device; compiled, not run, so the figures do not depend on the machine's load.
The program is compiled in a subprocess that runs this file, with its devices set up before JAX
starts (JAX only: `keras.distribution` is JAX's). Run alone, it prints what the test reads:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 KERAS_BACKEND=jax \\
        python tests/test_context_parallel_exchange.py
"""

import contextlib
import functools
import json
import re

import keras
import numpy as np
import pytest
from helpers import run_on_cpu_devices

DEVICES = 4
LENGTHS = (1024, 4096)
BATCH, HEADS, KEY_DIM = 8, 4, 16
# A collective of an optimized HLO module: its result type (an array or a tuple of them), then
# its kind; "-start" for the asynchronous form.
COLLECTIVE = re.compile(
    r"= (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\("
)


def compiled(steps, distribution=None):
    """The collectives, `[(result type, kind)]`, and the bytes per device (arguments, outputs and
    temporaries, less what aliases) of one `Aaren` layer's loss `sum(outputs²)` and its gradients
    with respect to the weights and the input, compiled under `distribution` or on one device."""
    import jax

    from keras_aaren import Aaren

    with distribution.scope() if distribution else contextlib.nullcontext():
        layer = Aaren(HEADS, KEY_DIM, return_sequences=True)
        layer.build((BATCH, steps, HEADS * KEY_DIM))
        weights = [v.value for v in layer.trainable_variables]
        x = np.ones((BATCH, steps, HEADS * KEY_DIM), "float32")
        if distribution:
            x = jax.device_put(x, distribution.get_data_layout(x.shape).backend_layout)

        def loss(weights, x):
            return keras.ops.sum(keras.ops.square(layer.stateless_call(weights, [], x)[0]))

        program = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(weights, x).compile()
    memory = program.memory_analysis()
    held = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return {
        "collectives": sorted(COLLECTIVE.findall(program.as_text())),
        "bytes_per_device": held - memory.alias_size_in_bytes,
    }


@functools.cache
def programs():
    return run_on_cpu_devices(__file__, DEVICES)


jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution runs on JAX only"
)


@jax_only
def test_the_exchange_does_not_grow_with_the_length():
    short, long = (programs()[str(steps)]["split"]["collectives"] for steps in LENGTHS)
    # The shards' summaries are gathered ...
    assert any(kind == "all-gather" for _, kind in short), short
    # ... and every collective is the same at both lengths: nothing of the sequence's size.
    assert short == long
    for steps in LENGTHS:
        assert programs()[str(steps)]["one_device"]["collectives"] == []


@jax_only
def test_each_device_holds_a_share_of_the_memory():
    # Within 1.3 times an even share: the weights and their gradients are on every device.
    split, one = (programs()[str(LENGTHS[-1])][where] for where in ("split", "one_device"))
    assert split["bytes_per_device"] <= 1.3 / DEVICES * one["bytes_per_device"]


if __name__ == "__main__":
    from keras_aaren.distribution import ContextParallel

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((DEVICES,), ["sequence"], devices[:DEVICES])
    found = {
        steps: {"split": compiled(steps, ContextParallel(mesh)), "one_device": compiled(steps)}
        for steps in LENGTHS
    }
    print(json.dumps(found))
