"""`aaren_scan`: Aaren over a whole sequence, validated and dispatched to one algorithm.

The algorithms live in their own modules: `sequential` (one token at a time), `associative` (the
paper's parallel prefix scan) and `chunked` (matrix products in chunks, the default); `naive` is
the O(T²) oracle they are tested against. `context_parallel` places any of them on devices that
split the time axis, where the caller asks for it (`sharding`).
"""

import functools

from keras import backend, ops

from keras_aaren.ops import backend as plumbing
from keras_aaren.ops.associative import scan_associative
from keras_aaren.ops.chunked import DEFAULT_CHUNK_SIZE, scan_chunked
from keras_aaren.ops.context_parallel import SequenceSharding, scan_context_parallel
from keras_aaren.ops.recurrence import identity_state, scan_dtype
from keras_aaren.ops.segments import final_state, segment_starts
from keras_aaren.ops.sequential import scan_sequential
from keras_aaren.validation import check_segment_ids, check_shape

METHODS = ("auto", "sequential", "associative", "chunked")


def check_method(method):
    """Raise a ValueError unless `method` is one of `METHODS`."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")


def _validate(scores, values, initial_state, mask, method, chunk_size, segment_ids, sharding):
    check_method(method)
    if sharding is not None and not isinstance(sharding, SequenceSharding):
        raise ValueError(
            "`sharding` must be a keras_aaren.ops.SequenceSharding or None. "
            f"Received: sharding={sharding!r}"
        )
    # A chunk must hold at least 2 tokens for the prefix over chunk summaries to be shorter than
    # the sequence it summarizes.
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 2:
        raise ValueError(
            f"`chunk_size` must be an integer >= 2. Received: chunk_size={chunk_size!r}"
        )
    check_shape("scores", scores.shape, (None,) * 3, "(batch_size, timesteps, num_heads)")
    layout = "(batch_size, timesteps, num_heads, value_dim)"
    check_shape("values", values.shape, (None,) * 4, layout)
    b, t, h = scores.shape
    d = values.shape[-1]
    if t == 0:
        raise ValueError(
            "`scores` and `values` must hold at least one timestep (axis 1, `timesteps`). "
            f"Received: scores.shape={tuple(scores.shape)}"
        )
    check_shape("values", values.shape, (b, t, h, d), layout)
    if mask is not None:
        check_shape("mask", mask.shape, (b, t), "(batch_size, timesteps)")
    if segment_ids is not None:
        dtype = backend.standardize_dtype(segment_ids.dtype)
        check_segment_ids(segment_ids.shape, dtype, (b, t))
    if initial_state is not None:
        if not isinstance(initial_state, (list, tuple)) or len(initial_state) != 3:
            raise ValueError(
                "`initial_state` must be a tuple (m, u, w). "
                f"Received: initial_state={initial_state!r}"
            )
        for name, x, shape in zip(("m", "u", "w"), initial_state, ((b, h), (b, h), (b, h, d))):
            check_shape(f"initial_state.{name}", ops.shape(x), shape)


def aaren_scan(
    scores,
    values,
    initial_state=None,
    mask=None,
    method="auto",
    chunk_size=DEFAULT_CHUNK_SIZE,
    segment_ids=None,
    sharding=None,
):
    """Aaren over a whole sequence: every prefix's attention output and the final state.

    The many-to-many attention of one query token (Feng et al., arXiv 2405.13956, eq. 3–5):

    $$o_k = \\frac{\\hat w_0 + \\sum_{i \\le k} e^{s_i - M_k} v_i}
                  {\\hat u_0 + \\sum_{i \\le k} e^{s_i - M_k}}$$

    where $(m_0, u_0, w_0)$ is `initial_state` and $\\hat u_0 = u_0 e^{m_0 - M_k}$,
    $\\hat w_0 = w_0 e^{m_0 - M_k}$, $M_k$ the running max. Masked tokens are identity elements:
    they change neither the state nor the output, which stays that of the last real token (0 before
    any). With `segment_ids`, several sequences packed in one row stay apart: a token whose
    segment id differs from the previous token's starts from "nothing seen", as if its sequence
    were alone, and `initial_state` seeds the first segment only. All methods agree to float
    rounding for any scores, including ramps that span thousands of units.

    Use it to build your own layer on Aaren's prefix reduction; `keras_aaren.Aaren` wraps it with
    the projections, and `aaren_attention_naive` is the plain O(T²) reference it equals.

    Args:
        scores: tensor `(batch_size, timesteps, num_heads)`, the scores $s_i = q \\cdot k_i /
            \\sqrt{d_k}$.
        values: tensor `(batch_size, timesteps, num_heads, value_dim)`, the values $v_i$.
        initial_state: optional tuple `(m, u, w)` of shapes `(batch_size, num_heads)`,
            `(batch_size, num_heads)`, `(batch_size, num_heads, value_dim)`. Defaults to the empty
            state; `u == 0` means empty whatever `m` is.
        mask: optional boolean tensor `(batch_size, timesteps)`, True for a real token.
        method: `"sequential"` (the recurrence, one token at a time), `"associative"` (the paper's
            parallel prefix scan with ⊕, `keras.ops.associative_scan`), `"chunked"` (a masked
            matrix product inside chunks of `chunk_size` with a per-row running max, and a prefix
            over the chunk summaries; no loop, so it compiles under XLA, and its gradient is a
            closed form) or `"auto"` (the default, `"chunked"` on every backend). Every method is
            plain `keras.ops`: it compiles with its caller (`fit`, `predict`, `jax.jit`,
            `tf.function`), for a static or an unknown length, and runs op by op when called
            eagerly, except where the package compiles a bounded number of programs on its
            own (`set_program_limit`): an eager call on JAX runs as one compiled program per
            length bucket, and a scan inside a TensorFlow graph of known shapes as one XLA
            program.
        chunk_size: int >= 2, the chunk length of `"chunked"`.
        segment_ids: optional integer tensor `(batch_size, timesteps)`: the segment of each
            token, as flash-linear-attention's `cu_seqlens` per token. Only changes between
            neighbours matter (ids need not be sorted or unique across a row), and a masked
            token still starts its segment.
        sharding: optional `SequenceSharding`: the time axis is split across the devices of a
            mesh axis (JAX), each device scans its part and the devices exchange only each
            part's summary. `keras_aaren.distribution.ContextParallel.sequence_sharding` gives
            the one its mesh implies; the layers pass it under that distribution.

    Returns:
        A tuple `(outputs, final_state)`: `outputs` of shape `(batch_size, timesteps, num_heads,
        value_dim)` in the dtype of `values`, and `final_state = (m, u, w)` in the scan dtype
        (float32; float64 for float64 inputs), that of the last segment. A row that saw no real
        token returns its initial state unchanged, or the empty state (zeros) if its last
        segment is not its first.

    Raises:
        ValueError: for a `method` that does not exist, a `chunk_size` below 2, tensors whose
            ranks or shapes do not match, `segment_ids` that are not integers, a sequence of
            no timesteps, or a `sharding` that is not a `SequenceSharding`.

    Examples:
        >>> import numpy as np
        >>> scores = np.random.randn(2, 5, 3).astype("float32")
        >>> values = np.random.randn(2, 5, 3, 4).astype("float32")
        >>> outputs, (m, u, w) = aaren_scan(scores, values)
        >>> tuple(outputs.shape), tuple(w.shape)
        ((2, 5, 3, 4), (2, 3, 4))
    """
    scores = ops.convert_to_tensor(scores)
    values = ops.convert_to_tensor(values)
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
    if segment_ids is not None:
        segment_ids = ops.convert_to_tensor(segment_ids)
    _validate(scores, values, initial_state, mask, method, chunk_size, segment_ids, sharding)
    if initial_state is not None:
        initial_state = tuple(ops.convert_to_tensor(x) for x in initial_state)
    args = (scores, values, initial_state, mask, segment_ids)
    if plumbing.runs_eagerly_on_jax(*args):
        return _eager_scan(*args, method, chunk_size, sharding)
    # One XLA program inside the caller's TensorFlow graph (see `set_program_limit`). Not the
    # associative scan: TensorFlow's XLA bridge cannot convert keras.ops.associative_scan.
    xla = method in ("auto", "chunked") and sharding is None
    if xla and plumbing.in_static_graph(*args):
        options = dict(method=method, chunk_size=chunk_size, sharding=None)
        key = (method, chunk_size, plumbing.signature(*_flat(args)))
        program = plumbing.GRAPH_PROGRAMS.get(key, lambda: _compile(options))
        if program is not None:
            return program(*args)
    return placed_scan(*args, method, chunk_size, sharding)


def _flat(args):
    scores, values, initial_state, mask, segment_ids = args
    return (scores, values, mask, segment_ids, *(initial_state or (None,)))


def placed_scan(scores, values, initial_state, mask, segment_ids, method, chunk_size, sharding):
    """`aaren_scan` on valid tensors, on one device or on the devices of `sharding`."""
    local = functools.partial(local_scan, method=method, chunk_size=chunk_size)
    if sharding is None:
        return local(scores, values, initial_state, mask, segment_ids)
    return scan_context_parallel(local, scores, values, initial_state, mask, segment_ids, sharding)


def _eager_scan(scores, values, initial_state, mask, segment_ids, method, chunk_size, sharding):
    """`placed_scan` as one compiled program per length bucket (see `backend.ProgramCache`).

    The padding is masked and continues the last segment, so it changes neither the outputs of
    the real tokens nor the final state.
    """
    steps = scores.shape[1]
    (scores, values), mask, segment_ids = plumbing.pad_to_bucket(
        (scores, values), mask, segment_ids, chunk_size
    )
    args = (scores, values, initial_state, mask, segment_ids)
    options = dict(method=method, chunk_size=chunk_size, sharding=sharding)
    # No owner: the program is a function of its key alone.
    key = (None, method, chunk_size, sharding, plumbing.signature(*_flat(args)))
    program = plumbing.EAGER_PROGRAMS.get(key, lambda: _compile(options))
    outputs, final = program(*args)
    return outputs[:, :steps], final


def _compile(options):
    return plumbing.compile_program(functools.partial(placed_scan, **options))


def local_scan(scores, values, initial_state, mask, segment_ids, method, chunk_size):
    """`aaren_scan` on one device, once its arguments are tensors and valid."""
    if mask is not None:
        mask = ops.cast(mask, "bool")
    starts = None if segment_ids is None else segment_starts(segment_ids)
    out_dtype = values.dtype
    dtype = scan_dtype(values.dtype)
    scores = ops.cast(scores, dtype)
    values = ops.cast(values, dtype)
    b, _, h = ops.shape(scores)
    d = values.shape[-1]
    if initial_state is None:
        start = tuple(ops.zeros_like(x) for x in identity_state(b, h, d, dtype))
    else:
        start = tuple(ops.cast(x, dtype) for x in initial_state)
    if method == "sequential":
        outputs, final = scan_sequential(scores, values, start, mask, starts)
    elif method == "associative":
        outputs, final = scan_associative(scores, values, start, mask, starts)
    else:
        outputs, final = scan_chunked(scores, values, start, mask, chunk_size, starts)
    restarted = None if starts is None else ops.any(starts, axis=1)
    return ops.cast(outputs, out_dtype), final_state(final, start, restarted)
