"""The scan against the memory floor: `aaren_scan` forward beside one cumulative sum.

Run (defaults: values of shape (8, T, 4, 16), float32):

    python -m benchmarks.scan                          # T = 1024 ... 16384
    python -m benchmarks.scan --lengths 4096 --repeats 5
    python -m benchmarks.scan --segment-length 100     # packed rows: a segment every 100 tokens
    KERAS_BACKEND=jax python -m benchmarks.scan        # eager and jax.jit, JAX's default device

A cumulative sum over the values reads and writes the tensor once: it is the least a prefix
reduction over them can cost. Each is timed from two callers, alike for both:

* TensorFlow: a caller's `tf.function` without XLA (each of the scan's operations a kernel of
  its own) and one with `jit_compile=True` (the scan fused with its caller); the cumulative sum
  is `tf.math.cumsum`;
* JAX: an eager call (`aaren_scan` then runs as one compiled program per length bucket,
  `jnp.cumsum` as one compiled op) and a caller's `jax.jit`. Each call waits for the device to
  finish.

With `--segment-length N`, the scan also runs on packed rows, timed beside the scan without
them by the same caller in the same process: `segment_ids` (an input of the caller, as in
training) start a new segment every N tokens (`aaren_scan(..., segment_ids=...)`), and the
ratio packed / scan is the cost of the segments.

The table reports medians of `--repeats` calls and the ratio scan / cumsum, and each call's
median count of minor page faults (fresh memory the OS had to hand over, see
`docs/benchmarks.md`). It also reports each one's effective bandwidth: the least traffic it
needs (the cumsum reads and writes the values; the scan reads the scores and the values and
writes its output) divided by its time, to set beside the memory bandwidth of the device.

It refuses to report (exit status 1) if the scan does not match the naive softmax oracle first.
Results go to `<output-dir>/scan.json`.
"""

import argparse
import statistics
import sys

import keras
import numpy as np

from benchmarks.common import machine, refuse_if_wrong, require_backend, timed, write_json
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
    """`[(caller, compile)]`: the two ways a function is called on this backend."""
    if keras.backend.backend() == "jax":
        import jax

        return [("eager", lambda fn: fn), ("jax.jit", jax.jit)]
    import tensorflow as tf

    return [
        (
            "tf.function(jit_compile=True)" if xla else "tf.function",
            lambda fn, xla=xla: tf.function(fn, jit_compile=xla),
        )
        for xla in (False, True)
    ]


def contenders(scan, segmented):
    """`[(name, fn)]`: the cumulative sum, the scan and, if `segmented`, the scan on packed
    rows, each taking `(scores, values, segment_ids)`."""
    pairs = [
        ("cumsum", lambda scores, values, ids: keras.ops.cumsum(values, axis=1)),
        ("scan", lambda scores, values, ids: scan(scores, values)[0]),
    ]
    if segmented:
        pairs.append(
            ("packed", lambda scores, values, ids: scan(scores, values, segment_ids=ids)[0])
        )
    return pairs


def wait(tensor):
    """The tensor once computed: fetched on TensorFlow, waited for on JAX (no copy to host)."""
    if keras.backend.backend() == "jax":
        return tensor.block_until_ready()
    return tensor.numpy()


def median_ms(fn, args, repeats):
    """Median milliseconds of `fn(*args)` and its median count of minor page faults."""
    for _ in range(2):
        wait(fn(*args))
    samples = [timed(lambda: wait(fn(*args))) for _ in range(repeats)]
    return tuple(statistics.median(column) for column in zip(*samples))


def main(argv=None, scan=aaren_scan):
    """Run the benchmark; return the exit status (1 when it refuses to report).

    Args:
        argv: command-line arguments, `sys.argv[1:]` by default.
        scan: the scan measured, `(scores, values) -> (attended, state)` as
            `keras_aaren.ops.aaren_scan` (the default); another implementation is measured
            against the same floor by passing it here.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--value-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--segment-length", type=int, default=None)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    require_backend(parser, "scan")

    if args.segment_length is not None and args.segment_length < 1:
        parser.error(f"--segment-length must be a positive integer, not {args.segment_length}")
    error = oracle_error(scan, args.segment_length)
    if refuse_if_wrong({"the scan": error}):
        return 1
    results = []
    for steps in args.lengths:
        scores = keras.random.normal((args.batch, steps, args.heads))
        values = keras.random.normal((args.batch, steps, args.heads, args.value_dim))
        # float32: 4 bytes an element.
        score_bytes, value_bytes = (4 * int(np.prod(t.shape)) for t in (scores, values))
        least_bytes = {"cumsum": 2 * value_bytes, "scan": score_bytes + 2 * value_bytes}
        ids = segments(args.batch, steps, args.segment_length)
        ids = keras.ops.convert_to_tensor(
            np.zeros((args.batch, steps), "int32") if ids is None else ids
        )
        least_bytes["packed"] = least_bytes["scan"]
        for caller, compile_fn in callers():
            row = {"T": steps, "caller": caller}
            for name, fn in contenders(scan, args.segment_length is not None):
                timing = median_ms(compile_fn(fn), (scores, values, ids), args.repeats)
                row[f"{name}_ms"], row[f"{name}_page_faults"] = timing
                row[f"{name}_gb_per_s"] = least_bytes[name] / row[f"{name}_ms"] / 1e6
            row["ratio"] = row["scan_ms"] / row["cumsum_ms"]
            packed = ""
            if "packed_ms" in row:
                row["packed_ratio"] = row["packed_ms"] / row["scan_ms"]
                packed = f"   packed {row['packed_ms']:8.3f} ms ({row['packed_ratio']:4.2f}x scan)"
            results.append(row)
            print(
                f"T={steps:6d} {row['caller']:32s} cumsum {row['cumsum_ms']:8.3f} ms "
                f"({row['cumsum_gb_per_s']:6.1f} GB/s)   scan {row['scan_ms']:8.3f} ms "
                f"({row['scan_gb_per_s']:6.1f} GB/s)   scan/cumsum {row['ratio']:5.2f}x   "
                f"page faults {row['cumsum_page_faults']:.0f} / {row['scan_page_faults']:.0f}"
                + packed,
                flush=True,
            )
    record = {
        "protocol": vars(args) | {"oracle_max_error": error},
        "machine": machine(),
        "results": results,
    }
    write_json(record, args.output_dir, "scan.json", indent=2)
    print(f"wrote {args.output_dir}/scan.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
