"""Backend plumbing of the ops, in one place: matmul precision, custom gradients, and the
programs the package compiles on its own behalf.

The algorithms in this package are written once on `keras.ops`. What differs between
TensorFlow, JAX and PyTorch is how a hand-written gradient is attached, how float32 matrix
products round on a GPU, and in which dtype PyTorch multiplies float64 matrices; those
conventions live here and nowhere else.

The ops are plain `keras.ops`, traced and compiled by their caller (Keras' `fit`, `predict` and
`evaluate`, a user's `jax.jit` or `tf.function`) for whatever lengths the caller allows, static
or unknown, and run op by op when called eagerly, except in two cases, each with a bounded
number of programs (`set_program_limit`): an eager call on JAX runs as one program per length
bucket, and a scan inside a TensorFlow graph of known shapes as one XLA program. A program
compiled per sequence length and kept without bound would grow a process that sees many
lengths.
"""

import collections
import contextlib
import threading

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


def matmul(a, b):
    """`keras.ops.matmul`, except that a float64 product is computed in float64 on every backend.

    Keras' type promotion computes a float64 `matmul` in float32 on PyTorch (it follows JAX's
    default of 32-bit types); `einsum` keeps the dtype of its inputs there. Other dtypes, and
    other backends, take `keras.ops.matmul` as it is.
    """
    if backend.backend() == "torch" and backend.standardize_dtype(a.dtype) == "float64":
        return ops.einsum("...ij,...jk->...ik", a, b)
    return ops.matmul(a, b)


def with_gradient(forward):
    """`forward` with a hand-written gradient, on every backend.

    `forward(*inputs)` returns `(outputs, backward)`: a tuple of output tensors and a function
    `backward(cotangents)` that takes one cotangent per output (zeros where the loss does not
    use that output) and returns one gradient per input. The result takes the same inputs and
    returns the tuple of outputs.

    Every input must be a tensor that gradients can flow to (pass masks as floats). Each backend
    has its own convention, hidden here: TensorFlow passes one cotangent per output (`None` for
    an unused one) and JAX one tuple, both through `keras.ops.custom_gradient`. Keras' PyTorch
    `custom_gradient` takes one output only, so on PyTorch the outputs go through a
    `torch.autograd.Function` of their own, which passes one cotangent per output (zeros for an
    unused one) with no packing of the outputs into one tensor and out again.
    """
    if backend.backend() == "torch":
        return lambda *inputs: tuple(_HandWrittenGradient.apply(forward, *inputs))

    def call(*inputs):
        @ops.custom_gradient
        def run(*inputs):
            outputs, backward = forward(*inputs)

            def grad(*args, upstream=None):
                if upstream is None:
                    upstream = args[0] if len(args) == 1 else args
                cotangents = [
                    ops.zeros_like(x) if g is None else g for g, x in zip(upstream, outputs)
                ]
                return tuple(backward(cotangents))

            return tuple(outputs), grad

        return tuple(run(*inputs))

    return call


if backend.backend() == "torch":
    import torch

    class _HandWrittenGradient(torch.autograd.Function):
        """`with_gradient` on PyTorch: `forward(*inputs)` returns `(outputs, backward)`, and
        `backward(cotangents)` the inputs' gradients. PyTorch runs the forward with gradients
        off and passes zeros as the cotangent of an output the loss does not use."""

        @staticmethod
        def forward(ctx, forward, *inputs):
            outputs, ctx.hand_written_backward = forward(*inputs)
            return tuple(outputs)

        @staticmethod
        def backward(ctx, *cotangents):
            return (None, *ctx.hand_written_backward(list(cotangents)))


# Eager calls on JAX. Run op by op, the scan's hundred-odd primitives each compile for every new
# shape, and JAX keeps each of those programs: a process that sees many lengths grows by tens
# of MiB per length. Eagerly, the scan (and a layer's whole sequence computation) instead runs
# as one program per length bucket (the length padded up to a power of two, the padding
# masked), and only the most recently used programs are kept. A caller's trace (`jax.jit`,
# Keras' compiled steps) never reaches this: there the scan is plain `keras.ops` in the
# caller's program.


class ProgramCache:
    """The compiled programs of eager calls on JAX: bounded, least recently used first out.

    A key holds everything the program depends on besides its array arguments: what computes
    (an owner token for a layer, the options that change its trace) and the shapes and dtypes of
    the arguments. A program holds no strong reference to a layer (see `layers.base`); `drop`
    forgets an owner's programs when it is garbage-collected. Safe to use from several threads.
    """

    def __init__(self, limit=8):
        self._limit = limit
        self._programs = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        """The program of `key`, made by `make()` on first use; the least recently used beyond
        the limit are dropped."""
        with self._lock:
            program = self._programs.pop(key, None)
            if program is None:
                program = make()
            self._programs[key] = program
            self._evict()
            return program

    def drop(self, owner):
        """Forget every program whose key starts with `owner`."""
        with self._lock:
            for key in [k for k in self._programs if k[0] is owner]:
                del self._programs[key]

    def set_limit(self, limit):
        with self._lock:
            self._limit = limit
            self._evict()

    def __len__(self):
        return len(self._programs)

    def _evict(self):
        while len(self._programs) > self._limit:
            self._programs.popitem(last=False)


#: The programs of eager calls on JAX, of `aaren_scan` and of the layers alike.
EAGER_PROGRAMS = ProgramCache()


# Graphs on TensorFlow. Keras does not compile with XLA on a CPU by default, and run as plain
# graph ops the scan's hundred-odd small ops cost more than the projections around it. Inside a
# caller's graph whose shapes are all known, the scan instead runs as one XLA program: one per
# distinct signature, each traced once, where the caller's trace sees it. A caller's graph
# keeps a program it has traced for as long as that graph lives, so these are counted, not
# evicted: beyond the limit, new signatures run as plain ops. A length unknown when the caller
# traces (Keras' `predict` relaxes its shapes after a few lengths) always runs as plain ops:
# XLA would compile again for every length at run time.


class GraphPrograms:
    """The scan's XLA programs inside TensorFlow graphs: at most `limit`, first come first kept.

    Safe to use from several threads.
    """

    def __init__(self, limit=8):
        self._limit = limit
        self._programs = {}
        self._lock = threading.Lock()

    def get(self, key, make):
        """The program of `key`, made by `make()` on first use; None once `limit` programs
        exist and `key` is not among them."""
        with self._lock:
            program = self._programs.get(key)
            if program is None and len(self._programs) < self._limit:
                program = self._programs[key] = make()
            return program

    def set_limit(self, limit):
        with self._lock:
            self._limit = limit

    def __len__(self):
        return len(self._programs)


#: The scan's XLA programs inside TensorFlow graphs of known shapes.
GRAPH_PROGRAMS = GraphPrograms()


def in_static_graph(*tensors):
    """Whether a TensorFlow call is traced into a graph and knows every shape of `tensors`."""
    if backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    if tf.executing_eagerly():
        return False
    leaves = [x for x in _leaves(tensors) if x is not None]
    return all(None not in tuple(x.shape) for x in leaves)


def _leaves(tensors):
    for x in tensors:
        if isinstance(x, (list, tuple)):
            yield from _leaves(x)
        else:
            yield x


def compile_program(fn):
    """`fn` as one compiled program: `jax.jit` on JAX, `tf.function(jit_compile=True)` on
    TensorFlow."""
    if backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, autograph=False)


def set_program_limit(limit):
    """Set how many programs the package compiles on its own behalf, on each backend.

    * JAX, eager calls (outside any `jax.jit` or Keras' compiled `fit` and `predict`):
      `aaren_scan` and the layers run as one compiled program per shape, with the length padded
      up to a power of two (at least the chunk size) and the padding masked, so that sequences
      of any length share a few programs. The least recently used program beyond `limit` is
      dropped, and a layer's programs go when the layer does.
    * TensorFlow, inside a caller's graph whose shapes are all known (Keras' `fit`, `predict`
      and `evaluate` on fixed shapes, a user's `tf.function`): `aaren_scan` runs as one XLA
      program per signature. A caller's graph keeps the programs it was traced with, so the
      first `limit` signatures are kept and later ones run as plain TensorFlow ops; lowering the
      limit affects only signatures not yet compiled.
    * PyTorch compiles nothing on the package's behalf.

    Inside a caller's `jax.jit`, or a TensorFlow graph of unknown shapes, the scan is plain
    `keras.ops` in the caller's program. (Inside a TensorFlow graph that XLA compiles as a
    whole, `jit_compile=True`, the scan's program is compiled into the caller's.)

    Args:
        limit: int >= 1, the number of programs of each kind (8 by default).

    Returns:
        None.

    Raises:
        ValueError: if `limit` is not a positive integer.

    Examples:
        >>> set_program_limit(4)  # no new program beyond 4 of each kind
        >>> set_program_limit(8)
    """
    check_positive_int("limit", limit)
    EAGER_PROGRAMS.set_limit(limit)
    GRAPH_PROGRAMS.set_limit(limit)


def program_count():
    """How many programs the package holds compiled on its own behalf (see `set_program_limit`):
    eager programs on JAX, the scan's XLA programs inside graphs on TensorFlow, 0 on PyTorch.

    Returns:
        int.

    Examples:
        >>> program_count() >= 0
        True
    """
    return len(EAGER_PROGRAMS) + len(GRAPH_PROGRAMS)


def runs_eagerly_on_jax(*tensors):
    """Whether a JAX call is eager: none of `tensors` belongs to a caller's trace.

    `jax.core.Tracer` is the class of every traced value (see `keras_aaren.compat`).
    """
    if backend.backend() != "jax":
        return False
    import jax

    leaves = jax.tree_util.tree_leaves(tensors)
    return not any(isinstance(x, jax.core.Tracer) for x in leaves)


def signature(*tensors):
    """The shapes and dtypes of `tensors` (None stays None): what a program is traced for."""
    return tuple(
        None if x is None else (tuple(x.shape), backend.standardize_dtype(x.dtype)) for x in tensors
    )


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
