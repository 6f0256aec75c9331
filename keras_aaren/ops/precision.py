"""Matrix products that round as float32 on every device."""

import contextlib

from keras import backend


def full_precision_matmuls():
    """A context in which float32 matmuls traced or run inside it round as float32.

    JAX multiplies float32 matrices on NVIDIA GPUs from Ampere on in TF32 by default, a 10-bit
    mantissa: on an H100, Aaren's chunked scan then drifted 1.6e-4 from stepping the same
    weights, and the naive oracle 1e-3 from the exact attention. Inside this context JAX uses
    its `"highest"` precision. The scan's products are (C × C) by (C × D) per chunk, a small
    share of a layer's work. Other backends compute float32 matmuls in float32 here already
    (PyTorch by default; TensorFlow on a CPU), so the context does nothing for them.

    Returns:
        A context manager: `jax.default_matmul_precision("highest")` on JAX, a null context on
        the other backends.

    Examples:

    >>> import numpy as np
    >>> from keras import ops
    >>> with full_precision_matmuls():
    ...     product = ops.matmul(np.eye(2, dtype="float32"), np.ones((2, 3), "float32"))
    >>> ops.convert_to_numpy(product).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    if backend.backend() == "jax":
        import jax

        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()
