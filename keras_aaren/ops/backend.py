"""Backend plumbing of the ops, in one place: matmul precision and custom gradients.

The algorithms in this package are written once on `keras.ops`. What differs between
TensorFlow, JAX and PyTorch is how a hand-written gradient is attached and how float32 matrix
products round on a GPU; those conventions live here and nowhere else.

Nothing here compiles: the ops are plain `keras.ops`, traced and compiled by their caller
(Keras' `fit`, `predict` and `evaluate`, a user's `jax.jit` or `tf.function`) for whatever
lengths the caller allows, static or unknown, and run op by op when called eagerly. A program
compiled per sequence length and kept by the package would grow a process that sees many
lengths without bound.
"""

import contextlib
import math

from keras import backend, ops


def full_precision_matmuls():
    """A context in which float32 matmuls traced or run inside it round as float32.

    JAX multiplies float32 matrices on NVIDIA GPUs from Ampere on in TF32 by default, a 10-bit
    mantissa, which moves the chunked scan and the naive oracle away from the exact attention by
    far more than float32 rounding. Inside this context JAX uses its `"highest"` precision. The
    scan's products are (C × C) by (C × D) per chunk, a small share of a layer's work. Other
    backends compute float32 matmuls in float32 here already (PyTorch by default; TensorFlow on a
    CPU), so the context does nothing for them.

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


def with_gradient(forward):
    """`forward` with a hand-written gradient, on every backend.

    `forward(*inputs)` returns `(outputs, backward)`: a tuple of output tensors and a function
    `backward(cotangents)` that takes one cotangent per output (zeros where the loss does not
    use that output) and returns one gradient per input. The result takes the same inputs and
    returns the tuple of outputs.

    Every input must be a tensor that gradients can flow to (pass masks as floats). Each backend
    has its own convention, hidden here: TensorFlow passes one cotangent per output (`None` for
    an unused one), JAX one tuple, and Keras' PyTorch `custom_gradient` supports one output and
    one cotangent, passed as a keyword, so there the outputs travel packed in one flat tensor.
    """
    packed = backend.backend() == "torch"

    def call(*inputs):
        shapes = []

        @ops.custom_gradient
        def run(*inputs):
            outputs, backward = forward(*inputs)
            shapes[:] = [tuple(ops.shape(x)) for x in outputs]

            def grad(*args, upstream=None):
                if upstream is None:
                    upstream = args[0] if len(args) == 1 else args
                if packed:
                    upstream = _unpack(upstream, shapes)
                cotangents = [
                    ops.zeros_like(x) if g is None else g for g, x in zip(upstream, outputs)
                ]
                return tuple(backward(cotangents))

            if packed:
                return _pack(outputs), grad
            return tuple(outputs), grad

        results = run(*inputs)
        return tuple(_unpack(results, shapes) if packed else results)

    return call


def _pack(tensors):
    return ops.concatenate([ops.reshape(x, (-1,)) for x in tensors], axis=0)


def _unpack(flat, shapes):
    tensors, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        tensors.append(ops.reshape(flat[start : start + size], shape))
        start += size
    return tensors
