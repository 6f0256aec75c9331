"""One sequence across devices: memory per device and bytes exchanged, from the compiled program.

Run (JAX; defaults: batch 8, 4 heads, value dimension 16, float32):

    KERAS_BACKEND=jax python -m benchmarks.context_parallel       # N = 1, 4, 8; T = 4096 ... 65536
    KERAS_BACKEND=jax python -m benchmarks.context_parallel --devices 1 2 --lengths 1024 --what scan

For each number of devices N and total length T, the forward and backward program (the loss
`sum(outputs²)` and its gradients) is compiled with the time axis split across N devices under
`keras_aaren.distribution.ContextParallel` (N = 1: one device, no distribution), and read, not
run:

* memory per device: XLA's buffer plan of the compiled program (`memory_analysis()`), the
  arguments, outputs and temporaries of one device, and their sum less what aliases (the peak
  the plan allows); beside it the ratio to one device's at the same T, and the target
  `1.3 / N` (plus a constant);
* bytes exchanged: every collective of the optimized program (`as_text()`: all-gather,
  all-reduce, reduce-scatter, collective-permute, all-to-all) and the bytes of its result on one
  device, summed. For the scan they are the shards' summaries, the same at every T.

`--what` picks the program: `scan` (`keras_aaren.ops.aaren_scan` on scores and values) and
`layer` (one `keras_aaren.Aaren` layer of width heads × value dimension, its projections
included, gradients of its weights and its input).

Both are deterministic, so the figures do not depend on the load of the machine. The N devices
are the first N of one child process that has `max(--devices)` of them: on a CPU, virtual
devices (`XLA_FLAGS=--xla_force_host_platform_device_count`), which the child sets before JAX
starts. It refuses to report (exit status 1) if the scan split across the most devices does not
match the naive softmax oracle (with a mask and segments) first. Results go to
`<output-dir>/context_parallel.json`.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys

import keras

from benchmarks.common import machine, refuse_if_wrong, require_backend, write_json

# A collective's line in an optimized HLO module: its result type (an array, or a tuple of
# them), its kind; "-start" for the asynchronous form, whose tuple holds operands then results.
COLLECTIVE = re.compile(
    r"= (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\("
)
ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2}


def collectives(text):
    """`[(kind, shape, bytes)]` of every array a collective of an optimized HLO module returns."""
    found = []
    for line in text.splitlines():
        match = COLLECTIVE.search(line)
        if match is None:
            continue
        result, kind, asynchronous = match.groups()
        # Scalars (`u32[]`) are the asynchronous form's bookkeeping, not data.
        arrays = [(dtype, dims) for dtype, dims in ARRAY.findall(result) if dims]
        if asynchronous:
            arrays = arrays[len(arrays) // 2 :]
        for dtype, dims in arrays:
            size = math.prod(int(d) for d in dims.split(","))
            found.append((kind, f"{dtype}[{dims}]", size * BYTES.get(dtype, 4)))
    return sorted(found)


def distribution_on(devices):
    """`ContextParallel` over the first `devices` devices, or None for one device."""
    from keras_aaren.distribution import ContextParallel

    if devices == 1:
        return None
    mesh = keras.distribution.DeviceMesh(
        (devices,), ["sequence"], keras.distribution.list_devices()[:devices]
    )
    return ContextParallel(mesh)


def oracle_error(devices):
    """The largest difference between the scan split across `devices` and the naive oracle."""
    import contextlib

    import jax
    import numpy as np

    from keras_aaren.ops import aaren_attention_naive, aaren_scan

    rng = np.random.default_rng(0)
    steps = 16 * devices
    scores = rng.normal(size=(2, steps, 3)) * 5.0
    values = rng.normal(size=(2, steps, 3, 4))
    mask = rng.random((2, steps)) > 0.2
    ids = np.broadcast_to(np.arange(steps) // 11, (2, steps)).astype("int32")
    expected, _ = aaren_attention_naive(scores, values, mask=mask, segment_ids=ids)
    distribution = distribution_on(devices)

    def run(scores, values, mask, ids):
        return aaren_scan(scores, values, mask=mask, segment_ids=ids)[0]

    with distribution.scope() if distribution else contextlib.nullcontext():
        got = jax.jit(run)(scores.astype("float32"), values.astype("float32"), mask, ids)
    return float(np.abs(np.asarray(got) - np.asarray(expected)).max())


def program(what, devices, batch, steps, heads, value_dim):
    """The compiled forward and backward program, with the time axis on `devices` devices."""
    import contextlib

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from keras_aaren import Aaren
    from keras_aaren.ops import aaren_scan

    distribution = distribution_on(devices)

    def placed(shape, tokens=True):
        """An abstract float32 input: a sequence laid out by the distribution, or replicated."""
        if distribution is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        elif tokens:
            sharding = distribution.get_data_layout(shape).backend_layout
        else:
            sharding = NamedSharding(distribution.device_mesh.backend_mesh, PartitionSpec())
        return jax.ShapeDtypeStruct(shape, "float32", sharding=sharding)

    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        if what == "scan":

            def loss(scores, values):
                outputs, _ = aaren_scan(scores, values)
                return keras.ops.sum(outputs * outputs)

            args = (placed((batch, steps, heads)), placed((batch, steps, heads, value_dim)))
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        else:
            width = heads * value_dim
            layer = Aaren(heads, value_dim, return_sequences=True)
            layer.build((batch, steps, width))

            def loss(weights, x):
                outputs, _ = layer.stateless_call(weights, [], x)
                return keras.ops.sum(outputs * outputs)

            weights = [placed(tuple(v.shape), tokens=False) for v in layer.trainable_variables]
            args = (weights, placed((batch, steps, width)))
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return step.lower(*args).compile()


def measure(what, devices, batch, steps, heads, value_dim):
    """One row: the compiled program's memory per device and its collectives."""
    compiled = program(what, devices, batch, steps, heads, value_dim)
    memory = compiled.memory_analysis()
    found = collectives(compiled.as_text())
    row = {
        "what": what,
        "N": devices,
        "T": steps,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "collectives": [list(c) for c in found],
        "collective_bytes": sum(size for _, _, size in found),
    }
    row["peak_bytes"] = (
        row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    )
    return row


def child(options):
    """Measure every (what, T, N) in this process, which has the devices; print JSON."""
    import jax

    needed = max(options["devices"])
    if len(jax.devices()) < needed:
        raise SystemExit(f"benchmarks.context_parallel needs {needed} devices")
    record = {"oracle_max_error": oracle_error(needed), "results": [], "machine": machine()}
    if record["oracle_max_error"] <= options["tolerance"]:
        for what in options["what"]:
            for steps in options["lengths"]:
                for devices in options["devices"]:
                    shape = (options["batch"], steps, options["heads"], options["value_dim"])
                    row = measure(what, devices, *shape)
                    record["results"].append(row)
                    print(f"measured {what} N={devices} T={steps}", file=sys.stderr, flush=True)
    print(json.dumps(record))


def table(results):
    """Print the rows with the ratio of each peak to one device's at the same T."""
    one = {(r["what"], r["T"]): r["peak_bytes"] for r in results if r["N"] == 1}
    print(
        f"{'what':6s} {'N':>2s} {'T':>6s} {'peak MiB/device':>16s} {'÷ one device':>13s} "
        f"{'target ≤':>9s} {'temp MiB':>9s} {'exchanged bytes':>16s}"
    )
    for r in results:
        base = one.get((r["what"], r["T"]))
        r["peak_vs_one_device"] = None if base is None else r["peak_bytes"] / base
        ratio = "" if base is None else f"{r['peak_vs_one_device']:.3f}"
        print(
            f"{r['what']:6s} {r['N']:2d} {r['T']:6d} {r['peak_bytes'] / 2**20:16.1f} "
            f"{ratio:>13s} {1.3 / r['N']:9.3f} {r['temp_bytes'] / 2**20:9.1f} "
            f"{r['collective_bytes']:16d}"
        )


def main(argv=None):
    """Run the benchmark; return the exit status (1 when it refuses to report)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--what", nargs="+", choices=["scan", "layer"], default=["scan", "layer"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--value-dim", type=int, default=16)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    require_backend(parser, "context_parallel", ("jax",))
    if args.child:
        child(json.loads(args.child))
        return 0
    if min(args.devices) < 1:
        parser.error(f"--devices must be positive integers, not {args.devices}")

    from benchmarks.common import ORACLE_TOLERANCE

    options = {
        "devices": sorted(set(args.devices)),
        "lengths": args.lengths,
        "what": args.what,
        "batch": args.batch,
        "heads": args.heads,
        "value_dim": args.value_dim,
        "tolerance": ORACLE_TOLERANCE,
    }
    # The devices must exist before JAX starts: a child process, with as many as the most asked.
    flags = os.environ.get("XLA_FLAGS", "")
    count = f"--xla_force_host_platform_device_count={max(options['devices'])}"
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": f"{flags} {count}".strip()}
    command = [sys.executable, "-m", "benchmarks.context_parallel", "--child", json.dumps(options)]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        print(f"the measuring process failed (exit status {result.returncode})")
        return 1
    record = json.loads(result.stdout.strip().splitlines()[-1])
    error = record.pop("oracle_max_error")
    if refuse_if_wrong({f"the scan on {max(options['devices'])} devices": error}):
        return 1
    table(record["results"])
    record["protocol"] = options | {"oracle_max_error": error}
    path = write_json(record, args.output_dir, "context_parallel.json", indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
