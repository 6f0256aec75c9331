"""full_precision_matmuls: the scan's and the oracle's products ask JAX for float32 rounding.

The rounding itself differs only on a GPU (TF32); these tests read what the traced program asks
for, which any JAX device shows.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_aaren.ops import aaren_attention_naive, aaren_scan, full_precision_matmuls

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="matmul precision is a JAX setting"
)


@pytest.fixture(autouse=True)
def device_default_precision():
    # conftest asks for "highest" globally; these tests need a user's default (None).
    import jax

    with jax.default_matmul_precision(None):
        yield


def dot_precisions(fn, *args):
    """The `precision` of every dot_general in `fn`'s program, nested programs included."""
    import jax

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn.params["precision"]
            for param in eqn.params.values():
                for inner in param if isinstance(param, (tuple, list)) else [param]:
                    inner = inner if hasattr(inner, "eqns") else getattr(inner, "jaxpr", None)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def highest():
    import jax

    return (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def inputs(steps):
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(2, steps, 3)).astype("float32"),
        rng.normal(size=(2, steps, 3, 4)).astype("float32"),
    )


def scan_forward(scores, values):
    return aaren_scan(scores, values, method="chunked")[0]


def scan_gradients(scores, values):
    import jax

    return jax.grad(lambda s, v: ops.sum(scan_forward(s, v) ** 2), argnums=(0, 1))(scores, values)


def naive(scores, values):
    return aaren_attention_naive(scores, values)[0]


def test_a_plain_matmul_leaves_precision_to_the_device():
    # The control: outside the context, JAX records no precision, and a GPU picks TF32.
    a = np.ones((2, 2), "float32")
    assert dot_precisions(ops.matmul, a, a) == [None]
    with full_precision_matmuls():
        assert dot_precisions(ops.matmul, a, a) == [highest()]


@pytest.mark.parametrize(
    "fn", [scan_forward, scan_gradients, naive], ids=["chunked", "chunked-grad", "naive"]
)
@pytest.mark.parametrize("steps", [5, 63], ids=["T5", "T63"])
def test_products_round_as_float32(fn, steps):
    precisions = dot_precisions(fn, *inputs(steps))
    assert precisions
    assert all(p == highest() for p in precisions)
