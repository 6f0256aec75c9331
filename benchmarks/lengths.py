"""Many distinct sequence lengths in one process: Aaren against an LSTM of the same width.

Run (defaults: 1000 distinct lengths, batch 1, width 32; the current backend, TensorFlow or JAX):

    python -m benchmarks.lengths                          # lengths 10 ... 1009
    python -m benchmarks.lengths --lengths 200 --warmup 50
    python -m benchmarks.lengths --scenarios predict      # one scenario
    python -m benchmarks.lengths --scenarios bucketed --bucket 128
    KERAS_BACKEND=jax python -m benchmarks.lengths

A program compiled for one input shape and kept (a cached XLA function, a `jax.jit` per shape) is
fast on one length and a cost on many: every new length compiles again, and what was compiled
stays in the process. This measures that cost where a user meets it. The contenders, each
`keras.Sequential([keras.Input((None, 32)), layer])`:

* `aaren`: `keras_aaren.Aaren(4, 16, return_sequences=True)` (its output is as wide as its
  input, 32);
* `lstm`: `keras.layers.LSTM(64, return_sequences=True)`, as wide as Aaren's 4 heads of 16.

Three scenarios, each in a fresh process per contender, so that what one contender compiles and
keeps does not count against the other:

* `predict`: `model.predict(x, verbose=0)` on one sequence of each of `--lengths` distinct
  lengths, `--shortest` to `--shortest + --lengths - 1`, in an order shuffled with `--seed` (the
  same for both contenders): every call is on a length the process has not seen;
* `bucketed`: the same calls with each sequence padded at its end up to the next multiple of
  `--bucket` (64) and the outputs cut back to its length, the remedy for a caller that compiles
  one program per input shape. Both layers are causal, so the padding changes no output of a
  real token; what a new length costs is then at most one program per bucket;
* `eager`: the layer called directly, `layer(x)`, on the same lengths, its output fetched.

Each process records its resident memory (VmRSS) and the wall time of every call. Reported per
scenario and contender: the growth of resident memory from after the first `--warmup` lengths
(100, or half the lengths when there are fewer than 200) to the end, and the median time of the
calls after them (each on a new length). Beside them, the targets, each from the two
contenders of the same run:

* `predict`: Aaren's growth at most the LSTM's + 50 MiB on TensorFlow, at most the LSTM's on
  JAX; Aaren's time per new-length call at most 1.5 times the LSTM's;
* `eager`: Aaren's growth at most the LSTM's + 100 MiB.

`bucketed` has no target: it shows what the padding recipe leaves of the `predict` costs.

It refuses to report (exit status 1) unless Aaren's output on a short sequence, from
`model.predict` (as it is and padded to its bucket) and from the layer called directly, equals
`keras.layers.RNN` stepping the same cell with the same weights (to 1e-5). Results go to
`<output-dir>/lengths.json` and `<output-dir>/lengths.png` (resident memory against the call).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import keras
import numpy as np

from benchmarks.common import (
    machine,
    pyplot,
    refuse_if_wrong,
    require_backend,
    status_bytes,
    to_host,
    write_json,
)
from keras_aaren import Aaren
from keras_aaren.ops import full_precision_matmuls

WIDTH = 32
CONTENDERS = {
    "aaren": lambda: Aaren(4, 16, return_sequences=True),
    "lstm": lambda: keras.layers.LSTM(64, return_sequences=True),
}
SCENARIOS = ("predict", "bucketed", "eager")
# The largest difference between Aaren and its cell stepped by `keras.layers.RNN` accepted.
TOLERANCE = 1e-5
# How far Aaren's resident growth may exceed the LSTM's, in MiB, per scenario and backend.
GROWTH_ALLOWANCE_MIB = {"predict": {"tensorflow": 50.0, "jax": 0.0}, "eager": 100.0}
# How many times the LSTM's time per new-length `predict` call Aaren's may take.
PREDICT_TIME_RATIO = 1.5
# The `bucketed` scenario pads every sequence up to a multiple of this many steps.
DEFAULT_BUCKET = 64
# The folder that holds the `benchmarks` package: the children import it from there.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(contender):
    """The contender's model and its layer."""
    layer = CONTENDERS[contender]()
    return keras.Sequential([keras.Input((None, WIDTH)), layer]), layer


def lengths_in_order(count, shortest, seed):
    """The `count` lengths from `shortest` on, in the order the calls see them."""
    return (shortest + np.random.default_rng(seed).permutation(count)).tolist()


def predict_in_bucket(model, x, bucket):
    """`model.predict` on `x` padded at its end up to a multiple of `bucket` steps, the outputs
    cut back to `x`'s steps: for a causal model, the outputs of `x` alone."""
    steps = x.shape[1]
    padded = np.pad(x, ((0, 0), (0, -steps % bucket), (0, 0)))
    return model.predict(padded, verbose=0)[:, :steps]


def stepping_errors(seed=0, bucket=DEFAULT_BUCKET):
    """How far Aaren, through `model.predict` (as it is and padded to its bucket) and called
    directly, is from `keras.layers.RNN` stepping its cell, same weights, on a `(1, 13, WIDTH)`
    sequence: `{name: max error}`."""
    x = np.random.default_rng(seed).normal(size=(1, 13, WIDTH)).astype("float32")
    model, layer = build("aaren")
    with full_precision_matmuls():
        expected = to_host(keras.layers.RNN(layer.cell, return_sequences=True)(x))
        got = {
            "aaren/predict": model.predict(x, verbose=0),
            "aaren/bucketed": predict_in_bucket(model, x, bucket),
            "aaren/eager": to_host(layer(x)),
        }
    return {name: float(np.abs(y - expected).max()) for name, y in got.items()}


def measure(scenario, contender, lengths, seed, bucket=DEFAULT_BUCKET):
    """One child's record: the seconds of every call and the resident bytes after it."""
    model, layer = build(contender)
    call = {
        "predict": lambda x: model.predict(x, verbose=0),
        "bucketed": lambda x: predict_in_bucket(model, x, bucket),
        "eager": lambda x: to_host(layer(x)),
    }[scenario]
    rng = np.random.default_rng(seed + 1)
    seconds, resident = [], []
    for steps in lengths:
        x = rng.normal(size=(1, steps, WIDTH)).astype("float32")
        start = time.perf_counter()
        call(x)
        seconds.append(time.perf_counter() - start)
        resident.append(status_bytes("VmRSS"))
    return {"seconds": seconds, "resident_bytes": resident}


def run_child(scenario, contender, args):
    """`measure` in a fresh process; `(record, None)`, or `(None, why)` if the child failed."""
    command = [sys.executable, "-m", "benchmarks.lengths", "--child", scenario, contender]
    command += ["--lengths", str(args.lengths), "--shortest", str(args.shortest)]
    command += ["--seed", str(args.seed), "--bucket", str(args.bucket)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        return None, lines[-1]
    return json.loads(child.stdout.strip().splitlines()[-1]), None


def summarise(record, warmup):
    """The figures reported from a child's record, after the first `warmup` calls."""
    resident = record["resident_bytes"]
    return {
        "resident_mib_after_warmup": resident[warmup - 1] / 2**20,
        "resident_mib_end": resident[-1] / 2**20,
        "growth_mib_after_warmup": (resident[-1] - resident[warmup - 1]) / 2**20,
        "median_ms_per_new_length": 1000 * statistics.median(record["seconds"][warmup:]),
    }


def targets(results, backend):
    """Each target that the scenarios run allow, from the two contenders of the run:
    `{name: {"value", "limit", "met"}}`, a difference in MiB or a ratio."""
    found = {}
    for scenario, rows in results.items():
        if scenario not in GROWTH_ALLOWANCE_MIB:
            continue
        aaren, lstm = rows["aaren"], rows["lstm"]
        allowance = GROWTH_ALLOWANCE_MIB[scenario]
        if isinstance(allowance, dict):
            allowance = allowance[backend]
        difference = aaren["growth_mib_after_warmup"] - lstm["growth_mib_after_warmup"]
        found[f"{scenario}_growth_minus_lstm_mib"] = {"value": difference, "limit": allowance}
        if scenario == "predict":
            ratio = aaren["median_ms_per_new_length"] / lstm["median_ms_per_new_length"]
            found["predict_time_over_lstm"] = {"value": ratio, "limit": PREDICT_TIME_RATIO}
    for target in found.values():
        target["met"] = target["value"] <= target["limit"]
    return found


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, default=1000, help="distinct lengths, one call each")
    parser.add_argument("--shortest", type=int, default=10, help="the shortest length")
    parser.add_argument(
        "--warmup", type=int, help="calls before the growth and the time are measured"
    )
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the order and the inputs")
    parser.add_argument(
        "--bucket", type=int, default=DEFAULT_BUCKET, help="`bucketed` pads to a multiple of this"
    )
    parser.add_argument(
        "--child", nargs=2, metavar=("SCENARIO", "CONTENDER"), help=argparse.SUPPRESS
    )
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    if args.lengths < 2:
        parser.error(f"--lengths must be at least 2. Received: {args.lengths}")
    if args.shortest < 1:
        parser.error(f"--shortest must be at least 1. Received: {args.shortest}")
    if args.bucket < 1:
        parser.error(f"--bucket must be at least 1. Received: {args.bucket}")
    if args.warmup is None:
        args.warmup = min(100, args.lengths // 2)
    if not 1 <= args.warmup < args.lengths:
        parser.error(
            "--warmup must be at least 1 and less than --lengths. "
            f"Received: --warmup {args.warmup} with --lengths {args.lengths}"
        )
    require_backend(parser, "lengths")
    return args


def main(argv=None):
    """Run the benchmark; return the exit status (1 when it refuses to report or a child fails)."""
    args = parse_args(argv)
    lengths = lengths_in_order(args.lengths, args.shortest, args.seed)
    if args.child:
        print(json.dumps(measure(*args.child, lengths, args.seed, args.bucket)))
        return 0

    errors = stepping_errors(args.seed, args.bucket)
    if refuse_if_wrong(errors, "keras.layers.RNN stepping its cell", TOLERANCE):
        return 1
    records = {scenario: {} for scenario in args.scenarios}
    results = {scenario: {} for scenario in args.scenarios}
    for scenario in args.scenarios:
        for contender in CONTENDERS:
            record, failure = run_child(scenario, contender, args)
            if failure is not None:
                print(f"{scenario} {contender}: the child failed: {failure}")
                return 1
            records[scenario][contender] = record
            row = results[scenario][contender] = summarise(record, args.warmup)
            print(
                f"{scenario:8s} {contender:6s} resident {row['resident_mib_after_warmup']:7.1f} "
                f"-> {row['resident_mib_end']:7.1f} MiB ({row['growth_mib_after_warmup']:+.1f}) "
                f"after {args.warmup} lengths; {row['median_ms_per_new_length']:8.2f} ms per "
                "call on a new length",
                flush=True,
            )

    backend = keras.backend.backend()
    found = targets(results, backend)
    if found:
        print(f"\ntargets ({backend}, Aaren against the LSTM of the same run):")
    for name, target in found.items():
        if name.endswith("_over_lstm"):
            value, limit = f"{target['value']:.2f}x", f"{target['limit']:g}x"
        else:
            value, limit = f"{target['value']:+.1f} MiB", f"{target['limit']:+g} MiB"
        print(
            f"  {name:30s} {value:>12s} (at most {limit}): {'met' if target['met'] else 'missed'}"
        )

    record = {
        "protocol": {k: v for k, v in vars(args).items() if k != "child"}
        | {"width": WIDTH, "stepping_errors": errors, "order": lengths},
        "machine": machine(),
        "results": results,
        "targets": found,
        "calls": records,
    }
    path = write_json(record, args.output_dir, "lengths.json", indent=1)
    plot(records, args, os.path.join(args.output_dir, "lengths.png"))
    print(f"wrote {path} and lengths.png")
    return 0


def plot(records, args, path):
    """Resident memory against the call, one panel per scenario, one line per contender."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(records), figsize=(6 * len(records), 4), squeeze=False)
    for ax, (scenario, rows) in zip(axes[0], records.items()):
        for contender, record in rows.items():
            resident = np.asarray(record["resident_bytes"]) / 2**20
            ax.plot(np.arange(1, len(resident) + 1), resident, label=contender)
        ax.axvline(args.warmup, color="grey", linestyle=":", label=f"after {args.warmup} lengths")
        ax.set_xlabel("call (each on a new length)")
        ax.set_ylabel("resident memory (MiB)")
        ax.set_title(scenario)
        ax.legend()
    fig.suptitle(
        f"{args.lengths} distinct lengths, batch 1, width {WIDTH} "
        f"({keras.backend.backend()}, one process per contender)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
