"""Backend plumbing of the ops, in one place: matmul precision, custom gradients, compilation.

The algorithms in this package are written once on `keras.ops`. What differs between
TensorFlow, JAX and PyTorch is how a hand-written gradient is attached, how a function is
compiled once per shape, and how float32 matrix products round on a GPU; those conventions live
here and nowhere else.
"""

import contextlib
import functools
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


def compiled(fn, static_argnums, xla=True):
    """`fn` compiled once per input shape where the backend compiles, else `fn` itself.

    * JAX: one `jax.jit` program, also when called eagerly: called op by op, a custom gradient is
      traced again on every call, and under an eager `jax.grad` (Keras' `fit` with
      `jit_compile=False`) each primitive compiles on its own for every new shape. Inside a
      caller's `jax.jit` the program nests and compiles with the caller's.
    * TensorFlow, with `xla=True`: an XLA-compiled `tf.function`, so an eager call runs one
      compiled program instead of a hundred Python-dispatched ops and a graph caller gets one
      function call that XLA compiles as a unit. Inside a function that XLA already compiles
      (`jit_compile=True`), `fn` runs inline: a nested `tf.function` there made Keras' compiled
      train step recompile on every epoch.
    * Otherwise (PyTorch, or `xla=False` on TensorFlow, for ops that XLA cannot compile there):
      `fn` runs as it is.

    Args:
        fn: the function; its arguments at `static_argnums` are Python values (a method name,
            a chunk size) that select a program rather than flow through it.
        static_argnums: tuple of int, the positions of those arguments.
        xla: whether TensorFlow may compile `fn` with XLA.
    """
    name = backend.backend()
    if name == "jax":
        return _jax_program(fn, tuple(static_argnums))
    if name == "tensorflow" and xla:
        return functools.partial(_call_tf_program, fn)
    return fn


@functools.cache
def _jax_program(fn, static_argnums):
    import jax

    return jax.jit(fn, static_argnums=static_argnums)


def _call_tf_program(fn, *args):
    import tensorflow as tf

    if tf.executing_eagerly():
        return _tf_program(fn, eager=True)(*args)
    if _in_xla_context():
        return fn(*args)
    return _tf_program(fn, eager=False)(*args)


@functools.cache
def _tf_program(fn, eager):
    """An XLA-compiled `tf.function` of `fn`, one for eager callers and one for graph callers.

    Eager calls have fully known shapes, so each length gets a trace of its own. Shared with
    graph callers, an eager call could reuse a trace made for an unknown length (Keras' `predict`
    relaxes its shapes after a few lengths), which rounds differently: a stream's outputs would
    then depend on what the process had run before.
    """
    import tensorflow as tf

    program = tf.function(fn, jit_compile=True, autograph=False)
    if eager:
        # One trace per length is the design, not a mistake in the caller's code: keep
        # TensorFlow from warning a user who calls a layer on many lengths that it retraces.
        # TensorFlow offers no public switch for that warning.
        program._omit_frequent_tracing_warning = True
    return program


def _in_xla_context():
    """Whether the current TF graph is already being compiled by XLA (`jit_compile=True`)."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    # TensorFlow has no public test for this.
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
