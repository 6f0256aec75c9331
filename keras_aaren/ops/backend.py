"""Backend plumbing of the ops, in one place: matmul precision and custom gradients.

The algorithms in this package are written once on `keras.ops`. What differs between
TensorFlow, JAX and PyTorch is how a hand-written gradient is attached and how float32 matrix
products round on a GPU; those conventions live here and nowhere else.

The ops are plain `keras.ops`, traced and compiled by their caller (Keras' `fit`, `predict` and
`evaluate`, a user's `jax.jit` or `tf.function`) for whatever lengths the caller allows, static
or unknown, and run op by op when called eagerly, except one case: an eager call on JAX runs
the scan as one program per length bucket, of which a bounded number is kept
(`set_eager_program_limit`). A program compiled per sequence length and kept without bound would
grow a process that sees many lengths.
"""

import collections
import contextlib
import math

from keras import backend, ops

from keras_aaren.validation import check_positive_int


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


# Eager calls on JAX. Run op by op, the scan's hundred-odd primitives each compile for every new
# shape, and JAX keeps each of those programs: a process that sees many lengths grows by tens
# of MiB per length. Eagerly, the scan instead runs as one program per length bucket (the
# length padded up to a power of two, the padding masked), and only the `eager_program_limit()`
# most recently used programs are kept. A caller's trace (`jax.jit`, Keras' compiled steps)
# never reaches this: there the scan is plain `keras.ops` in the caller's program.
_eager_limit = 8
_eager_programs = collections.OrderedDict()


def set_eager_program_limit(limit):
    """Set how many programs the scan keeps compiled for eager calls on JAX.

    Called eagerly on JAX (outside any `jax.jit` or Keras' compiled `fit` and `predict`),
    `aaren_scan` runs as one compiled program per shape, with the length padded up to a power of
    two (at least the chunk size) and the padding masked, so that sequences of any length share a
    few programs. The least recently used program beyond `limit` is dropped. Other backends
    compile nothing eagerly; there this setting has no effect.

    Args:
        limit: int >= 1, the number of programs kept (8 by default).

    Returns:
        None.

    Raises:
        ValueError: if `limit` is not a positive integer.

    Examples:
        >>> set_eager_program_limit(4)
        >>> eager_program_count() <= 4
        True
        >>> set_eager_program_limit(8)
    """
    global _eager_limit
    check_positive_int("limit", limit)
    _eager_limit = limit
    _evict()


def eager_program_count():
    """How many programs the scan holds compiled for eager calls (0 except on JAX).

    Returns:
        int, at most the limit of `set_eager_program_limit`.

    Examples:
        >>> eager_program_count() >= 0
        True
    """
    return len(_eager_programs)


def _evict():
    while len(_eager_programs) > _eager_limit:
        _eager_programs.popitem(last=False)


def runs_eagerly_on_jax(*tensors):
    """Whether a JAX call is eager: none of `tensors` belongs to a caller's trace."""
    if backend.backend() != "jax":
        return False
    import jax

    leaves = jax.tree_util.tree_leaves(tensors)
    return not any(isinstance(x, jax.core.Tracer) for x in leaves)


def padded_length(length, multiple):
    """The length bucket of an eager call: the next power of two, at least `multiple`."""
    return max(multiple, 1 << max(0, length - 1).bit_length())


def pad_to_bucket(tensors, mask, segment_ids, multiple, front=False):
    """Sequences padded along time (axis 1) up to their bucket, `padded_length(T, multiple)`.

    The padding is masked, and continues its neighbouring segment, so it changes neither the
    real tokens' outputs nor the final state of a scan that runs from front to back (with
    `front=True`, the padding goes first, for a scan that runs backwards).

    Args:
        tensors: sequences `(B, T, ...)`, padded with zeros.
        mask: bool `(B, T)` or None (all real).
        segment_ids: int `(B, T)` or None.
        multiple: the smallest bucket.
        front: pad before the first token instead of after the last.

    Returns:
        A tuple `(tensors, mask, segment_ids)`, padded; `mask` is never None.
    """
    batch, steps = tensors[0].shape[0], tensors[0].shape[1]
    pad = padded_length(steps, multiple) - steps
    mask = ops.ones((batch, steps), "bool") if mask is None else ops.cast(mask, "bool")
    where = (pad, 0) if front else (0, pad)

    def widths(x):
        return ((0, 0), where, *((0, 0),) * (len(x.shape) - 2))

    tensors = [ops.pad(x, widths(x)) for x in tensors]
    mask = ops.pad(mask, widths(mask), constant_values=False)
    if segment_ids is not None:
        segment_ids = ops.pad(segment_ids, widths(segment_ids), mode="edge")
    return tensors, mask, segment_ids


def eager_program(fn, key):
    """The compiled program of `fn` for `key`, compiled on first use, most recently used kept.

    Each program is the `jax.jit` of its own function object, so that dropping it releases what
    JAX compiled for it.
    """
    import jax

    program = _eager_programs.pop(key, None)
    if program is None:
        program = jax.jit(lambda *args: fn(*args))
    _eager_programs[key] = program
    _evict()
    return program
