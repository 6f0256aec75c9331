"""The scan against the memory floor: `aaren_scan` forward beside one cumulative sum.

Run (defaults: values of shape (8, T, 4, 16), float32, T = 1024 ... 16384):

    python -m benchmarks.scan
    python -m benchmarks.scan --segment-length 100     # and on packed rows
    KERAS_BACKEND=jax python -m benchmarks.scan        # eager and jax.jit, JAX's default device

A cumulative sum over the values reads and writes the tensor once: the least a prefix over them
can cost. Both run under two callers: on TensorFlow a `tf.function` without XLA and one with
`jit_compile=True`; on JAX an eager call (`aaren_scan` runs as one program per length bucket) and
a caller's `jax.jit`, each call waited for. With `--segment-length N` the scan also runs on packed
rows (`segment_ids`, an input of the caller, start a segment every N tokens). The three are timed
in turns after two untimed calls each, `--repeats` rounds; the table gives medians, scan ÷ cumsum
and packed ÷ scan. It refuses to report (exit status 1) if the scan does not match the naive
softmax oracle first. Results go to `<output-dir>/scan.json`.
"""

import functools
import statistics
import sys

import keras
import numpy as np

from benchmarks import common
from keras_aaren.ops import aaren_attention_naive, aaren_scan, full_precision_matmuls


def segments(batch, steps, segment_length):
    """`segment_ids` of rows packed with segments of `segment_length` tokens, or None."""
    if segment_length is None:
        return None
    return np.broadcast_to(np.arange(steps) // segment_length, (batch, steps)).astype("int32")


def oracle_error(scan, segment_length=None):
    """The largest difference between `scan`'s attended values and the naive oracle's, on
    scores spread wide enough (standard deviation 5) that a prefix without a running max would
    lose precision."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 300, 4)) * 5.0
    values = rng.normal(size=(2, 300, 4, 16))
    ids = segments(2, 300, segment_length)
    expected, _ = aaren_attention_naive(scores, values, segment_ids=ids)
    # A scan given without segments need not take `segment_ids`.
    packed = {} if ids is None else {"segment_ids": ids}
    with full_precision_matmuls():
        got, _ = scan(scores.astype("float32"), values.astype("float32"), **packed)
    return float(np.abs(keras.ops.convert_to_numpy(got) - np.asarray(expected)).max())


def callers():
    """`{name: compile}`: the two ways a function is called on this backend."""
    if keras.backend.backend() == "jax":
        import jax

        return {"eager": lambda fn: fn, "jax.jit": jax.jit}
    import tensorflow as tf

    return {
        common.compile_mode(xla): lambda fn, xla=xla: tf.function(fn, jit_compile=xla)
        for xla in (False, True)
    }


def wait(fn, *args):
    """`fn(*args)` once computed: fetched on TensorFlow, waited for on JAX (no copy to host)."""
    tensor = fn(*args)
    return tensor.block_until_ready() if keras.backend.backend() == "jax" else tensor.numpy()


def main(argv=None, scan=aaren_scan):
    """Run the benchmark; return the exit status (1 when it refuses to report).

    Args:
        argv: command-line arguments, `sys.argv[1:]` by default.
        scan: the scan measured, `(scores, values) -> (attended, state)` as
            `keras_aaren.ops.aaren_scan` (the default); another implementation is measured
            against the same floor by passing it here.
    """
    parser = common.parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--value-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--segment-length", type=int, default=None)
    positive = ("lengths", "batch", "heads", "value_dim", "repeats", "segment_length")
    args = common.parse(parser, argv, *positive)

    error = oracle_error(scan, args.segment_length)
    if common.refuse_if_wrong({"the scan": error}):
        return 1
    contenders = {
        "cumsum": lambda scores, values, ids: keras.ops.cumsum(values, axis=1),
        "scan": lambda scores, values, ids: scan(scores, values)[0],
    }
    if args.segment_length is not None:
        contenders["packed"] = lambda scores, values, ids: scan(scores, values, segment_ids=ids)[0]
    results = []
    for steps in args.lengths:
        scores = keras.random.normal((args.batch, steps, args.heads))
        values = keras.random.normal((args.batch, steps, args.heads, args.value_dim))
        ids = segments(args.batch, steps, args.segment_length or steps)
        data = (scores, values, keras.ops.convert_to_tensor(ids))
        for caller, compile_fn in callers().items():
            calls = {
                name: functools.partial(wait, compile_fn(fn), *data)
                for name, fn in contenders.items()
            }
            times = common.time_in_turns(calls, args.repeats, warmup=2)
            row = {"T": steps, "caller": caller}
            row |= {f"{name}_ms": 1000 * statistics.median(s) for name, s in times.items()}
            row["ratio"] = row["scan_ms"] / row["cumsum_ms"]
            line = f"T={steps:6d} {caller:30s} cumsum {row['cumsum_ms']:8.3f} ms   scan "
            line += f"{row['scan_ms']:8.3f} ms   scan/cumsum {row['ratio']:5.2f}x"
            if "packed_ms" in row:
                row["packed_ratio"] = row["packed_ms"] / row["scan_ms"]
                line += f"   packed {row['packed_ms']:8.3f} ms ({row['packed_ratio']:4.2f}x scan)"
            print(line, flush=True)
            results.append(row)
    record = {
        "protocol": vars(args) | {"oracle_max_error": error},
        "machine": common.machine(),
        "results": results,
    }
    print(f"wrote {common.write_json(record, args.output_dir, 'scan.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
