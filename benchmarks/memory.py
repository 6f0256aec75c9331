"""Peak memory of one forward+backward step: Aaren against the layers a user would pick instead.

Run (defaults: batch 8, width 64, 4 heads of 16, float32, T = 1024 ... 16384; Linux):

    python -m benchmarks.memory                                   # each step a tf.function
    python -m benchmarks.memory --jit-compile --only aaren tfp_style mha_causal   # under XLA
    KERAS_BACKEND=jax python -m benchmarks.memory                 # on a GPU: the device's

Each (contender, length) runs in `--processes` (3) fresh processes, one after the other, each
running the step of `benchmarks.layers` once (tracing and compiling it) before measuring. The
figure is the median over the processes, with the least and the most of any step: under a plain
`tf.function` the order in which TensorFlow's executor runs independent ops decides how many
large buffers are live at once, and it differs between processes. What a process measures: on
TensorFlow, the peak of the bytes its CPU allocator has in use during a step above those in use
before it (`tf.config.experimental.get_memory_info`), the median of 5 steps; on JAX on an
accelerator, the device allocator's peak during two steps (compilation's included: the peak
cannot be reset); on a JAX CPU, the peak resident growth over one step (VmHWM). JAX records also
keep XLA's plan of the step (`memory_analysis()`: temporaries and outputs). A process that grows
`--cap-gib` (10) past its start is stopped: a lower bound. It refuses to report (exit status 1)
if a contender that computes Aaren's attention does not match the naive softmax oracle first.
Results go to `<output-dir>/memory.json` and `memory.png`.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import keras

from benchmarks import common

MEASURED = ("aaren", "tfp_style", "mha_causal", "lstm")


def reset_peak():
    """Start the kernel's peak-resident counter (VmHWM) afresh and return where it starts."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return common.status_bytes("VmHWM")


def tensorflow_peak(run):
    """The bytes TensorFlow's CPU allocator had in use at the peak of `run()`, above those in use
    before it, whether or not the host's `malloc` gives freed memory back to the system."""
    import tensorflow as tf

    # Reset first, then read the baseline: a tensor freed in between would otherwise lower the
    # peak's start below the baseline.
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    run()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def measure(name, steps, args):
    """The child's record: `memory` (what was read), `peaks` (bytes of each measured step) and,
    on JAX, `planned` (XLA's temporaries and outputs). Prints `start <bytes>` before the first
    step, for the parent's watch."""
    layer = common.CONTENDERS[name].build(args.heads, args.key_dim)
    run = common.train_step(layer, args.batch, steps, args.heads * args.key_dim, args.jit_compile)
    print(f"start {common.status_bytes('VmRSS')}", flush=True)
    record = {}
    if keras.backend.backend() == "jax":
        import jax

        plan = run.memory_analysis()
        record["planned"] = plan.temp_size_in_bytes + plan.output_size_in_bytes
        stats = jax.devices()[0].memory_stats
        if stats() is not None:  # an accelerator; a CPU keeps no statistics
            held = stats()["bytes_in_use"]
            run()
            run()
            return record | {"memory": "device", "peaks": [stats()["peak_bytes_in_use"] - held]}
    run()
    if keras.backend.backend() == "tensorflow":
        return record | {"memory": "allocator", "peaks": [tensorflow_peak(run) for _ in range(5)]}
    before = reset_peak()
    run()
    return record | {"memory": "resident", "peaks": [common.status_bytes("VmHWM") - before]}


def run_child(command, env, cap):
    """Run one measuring child; stop it once it grows `cap` bytes past its `start` line.

    Returns `("measured", record)`, `("over_cap", cap)` or `("failed", the last line of its
    stderr that names an error, or its last line)`.
    """
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        line = child.stdout.readline()
        while line and not line.startswith("start "):
            line = child.stdout.readline()
        limit = int(line.split()[1]) + cap if line else None
        while limit is not None and child.poll() is None:
            if (common.status_bytes("VmRSS", child.pid) or 0) > limit:
                child.kill()
                child.wait()
                return "over_cap", cap
            time.sleep(0.005)
        output = child.stdout.read()
        if child.wait() != 0 or limit is None:
            errors.seek(0)
            lines = errors.read().strip().splitlines() or [f"exit status {child.returncode}"]
            return "failed", ([s for s in lines if "Error: " in s] or lines)[-1].strip()
    return "measured", json.loads(output.strip().splitlines()[-1])


def main(argv=None):
    """Run the benchmark; return the exit status (1 when it refuses to report)."""
    parser = common.parser(__doc__, jit_compile="the step")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--only", nargs="+", choices=MEASURED, default=list(MEASURED))
    parser.add_argument("--processes", type=int, default=3, help="per contender and length")
    parser.add_argument("--cap-gib", type=float, default=10.0, help="stop a child past this")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "T"), help="measure in this process")
    args = common.parse(parser, argv, "lengths", "batch", "heads", "key_dim", "processes")
    if args.cap_gib <= 0:
        parser.error(f"--cap-gib must be positive. Received: {args.cap_gib}")
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args)))
        return 0

    # JAX takes 75% of a GPU the first time it uses it, unless told not to: the device is for
    # the measuring children, not for this process's check nor for each child up front.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    errors = common.oracle_error({name: common.CONTENDERS[name] for name in args.only})
    if common.refuse_if_wrong(errors):
        return 1
    # A fixed mmap threshold lets glibc give large freed buffers back to the system.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TF_CPP_MIN_LOG_LEVEL="3")
    shape = ["--batch", str(args.batch), "--heads", str(args.heads), "--key-dim", str(args.key_dim)]
    shape += ["--jit-compile"] if args.jit_compile else []
    cap, mib = int(args.cap_gib * 2**30), 2**-20
    results = {name: {} for name in args.only}
    for steps in args.lengths:
        for name in args.only:
            command = [sys.executable, "-m", "benchmarks.memory", "--child", name, str(steps)]
            children = []
            for _ in range(args.processes):
                outcome, value = run_child([*command, *shape], env, cap)
                if outcome != "measured":
                    # The children that would follow it run the same step.
                    results[name][steps] = {outcome: value}
                    break
                children.append(value)
            else:
                every = [peak for child in children for peak in child["peaks"]]
                results[name][steps] = {
                    "memory": children[0]["memory"],
                    "peak": statistics.median(statistics.median(c["peaks"]) for c in children),
                    "least": min(every),
                    "most": max(every),
                    "planned": children[0].get("planned"),
                    "children": children,
                }
            row = results[name][steps]
            figure = f"failed: {row['failed']}" if "failed" in row else "stopped past the cap"
            if "peak" in row:
                least, peak, most = (row[k] * mib for k in ("least", "peak", "most"))
                figure = f"{peak:.1f} [{least:.1f}-{most:.1f}] MiB ({row['memory']})"
            print(f"T={steps:6d} {name:12s} {figure}", flush=True)

    mode = common.compile_mode(args.jit_compile)
    peaks = {
        n: {t: r["peak"] * mib for t, r in row.items() if "peak" in r} for n, row in results.items()
    }
    for name, row in peaks.items():
        growth = [row[2 * t] / row[t] for t in row if 2 * t in row and row[t] > 0]
        if growth:
            print(f"{name}: worst growth of the median peak per doubling of T {max(growth):.2f}x")
    record = {
        "protocol": {k: v for k, v in vars(args).items() if k != "child"}
        | {"compile": mode, "oracle_errors": errors},
        "machine": common.machine(),
        "results": results,
    }
    common.write_json(record, args.output_dir, "memory.json")
    common.plot_against_length(
        peaks,
        os.path.join(args.output_dir, "memory.png"),
        "peak working memory, MiB (median)",
        f"One layer, forward+backward, batch {args.batch}, width {args.heads * args.key_dim}, "
        f"{mode} ({common.device()})",
    )
    print(f"wrote {args.output_dir}/memory.json and memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
