"""Peak memory of one forward+backward step: Aaren against the layers a user would pick instead.

Run (defaults: batch 8, width 64, 4 heads of 16, float32; Linux):

    python -m benchmarks.memory                                  # T = 1024 ... 16384
    python -m benchmarks.memory --lengths 1024 2048 --only aaren lstm
    python -m benchmarks.memory --xla --only aaren tfp_style mha_causal   # the whole step in XLA
    KERAS_BACKEND=jax python -m benchmarks.memory     # on a GPU: the device's allocator

Each (contender, length) runs in `--processes` (3) fresh processes: each builds the layer and the
input, runs the compiled training step that `benchmarks.layers` times once (tracing and
compiling it), then runs it again and reports the working memory of one step, without the
compiler's. The figure is the median over the processes, reported with the least and the most
of any step: under a plain `tf.function`, the order in which TensorFlow's executor runs
independent ops decides how many large buffers are live at once, and it differs from process to
process. `--xla` compiles the whole step with XLA, whose buffer plan is the same in every
process.

On TensorFlow that is the peak of the bytes its CPU allocator has in use during a call, above
those in use before it (`tf.config.experimental.get_memory_info`, reset before the call): every
tensor the step allocates, the temporaries of its XLA kernels included (buffers of a few KiB may
not show). A process's figure is the median over its second to sixth calls; within a process the
executor mostly repeats its order, but not always. The peak resident memory over the second
call, above what the process held just before it (the kernel's peak-resident counter, reset with
`/proc/self/clear_refs`), is recorded beside it. The resident measure depends on the host: it
follows what is live only where `malloc` gives freed buffers back to the system (the children
run with a fixed `MALLOC_MMAP_THRESHOLD_` for that), and reads near 0 where `malloc` keeps them.
On JAX on a CPU, the resident measure is the one reported.

On an accelerator (JAX on a GPU), the step's memory is the device's, read from JAX's allocator
statistics: the peak bytes in use during the first two calls above what was in use before them.
That peak cannot be reset between calls, so it includes what compiling the step allocated on the
device (XLA's autotuning tries kernels there). On JAX every record also gives XLA's plan of the
compiled step (`memory_analysis()`: its temporaries and outputs), which no run perturbs. On JAX
the parent and the children run with `XLA_PYTHON_CLIENT_PREALLOCATE=false`: by default JAX takes
75% of a GPU when it first uses it, and the parent's correctness check would leave the children
a quarter of the card.

A contender that does not fit is measured too, as a lower bound: the parent watches each child's
resident size and stops it once it has grown by `--cap-gib` (default 10) above what it held
before its first call; the record then says the first call needed more than the cap. The first
call also traces the step, so every measured child reports its first call's growth too, for
comparison.

It refuses to report (exit status 1) if a measured contender that computes Aaren's attention
does not match the naive softmax oracle on a small case first. Results go to
`<output-dir>/memory.json` and `<output-dir>/memory.png`.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import keras

from benchmarks.common import (
    CONTENDERS,
    compile_mode,
    device,
    machine,
    oracle_error,
    plot_against_length,
    refuse_if_wrong,
    refuse_xla_off_tensorflow,
    require_backend,
    status_bytes,
    train_step_on,
    write_json,
)

MEASURED = ("aaren", "tfp_style", "mha_causal", "lstm")
# The line of a traceback that names the exception: "module.SomeError: message".
EXCEPTION_LINE = re.compile(r"\s*[\w.]+(Error|Exception): ")
# Steps whose TensorFlow allocator peaks a child reports the median of.
TF_STEPS = 5


def reset_peak():
    """Start the kernel's peak-resident counter (VmHWM) afresh from the current resident size,
    and return the size it starts from.

    The baseline is read from the counter itself, after the reset: a resident size read before
    it can exceed the counter's start when another thread frees memory in between, and the
    growth would come out negative."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmHWM")


def device_memory_stats():
    """The allocator statistics of JAX's default device, or None where it keeps none (a CPU)."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    return jax.devices()[0].memory_stats()


def tensorflow_peak(run):
    """The bytes TensorFlow's CPU allocator had in use at the peak of `run()`, above those in use
    before it: every tensor of the step and the temporaries of its XLA kernels, whether or not
    the host's `malloc` gives freed memory back to the system."""
    import tensorflow as tf

    # Reset first, then read the baseline: a tensor freed in between would otherwise lower the
    # peak's start below the baseline.
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    run()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def measure(name, steps, batch, heads, key_dim, xla=False):
    """The memory of one compiled forward+backward, as a dict of bytes.

    Prints `start <bytes>` before the first call, for the parent's watch. Returns `memory`
    (`"allocator"` on TensorFlow, `"device"` on a JAX accelerator, `"resident"` otherwise),
    `first_call` (the resident growth over the first call, tracing included), `peak` (the
    step's working memory), `peaks` (every measured step's, of which `peak` is the median), on
    TensorFlow `resident_peak` (the resident growth over the second call) and on JAX `planned`
    (XLA's temporaries and outputs for the compiled step). `xla` compiles TensorFlow's whole
    step with XLA.
    """
    layer = CONTENDERS[name].build(heads, key_dim)
    run = train_step_on(layer, batch, steps, heads * key_dim, xla)
    start = status_bytes("VmRSS")
    print(f"start {start}", flush=True)
    record = {}
    if hasattr(run, "memory_analysis"):
        plan = run.memory_analysis()
        record["planned"] = plan.temp_size_in_bytes + plan.output_size_in_bytes
    stats = device_memory_stats()
    if stats is not None:
        held = stats["bytes_in_use"]
        run()
        first_call = device_memory_stats()["peak_bytes_in_use"] - held
        run()
        peak = device_memory_stats()["peak_bytes_in_use"] - held
        return record | {
            "memory": "device",
            "first_call": first_call,
            "peak": peak,
            "peaks": [peak],
        }
    held = reset_peak()
    run()
    first_call = status_bytes("VmHWM") - held
    before = reset_peak()
    if keras.backend.backend() == "tensorflow":
        peaks = [tensorflow_peak(run)]
        resident = status_bytes("VmHWM") - before
        # The peak depends on the order in which the executor's threads run the step's ops,
        # mostly the same from step to step of a process: hence several steps.
        peaks += [tensorflow_peak(run) for _ in range(TF_STEPS - 1)]
        return record | {
            "memory": "allocator",
            "first_call": first_call,
            "peak": statistics.median(peaks),
            "peaks": peaks,
            "resident_peak": resident,
        }
    run()
    peak = status_bytes("VmHWM") - before
    return record | {"memory": "resident", "first_call": first_call, "peak": peak, "peaks": [peak]}


def run_child(command, env, cap):
    """Run one measuring child; stop it once it grows `cap` bytes past its `start` line.

    Returns `("measured", record)` with the dict of `measure`, `("over_cap", cap)` if the child
    had to be stopped, or `("failed", message)` with the last exception line it wrote to stderr,
    or its last line if none names one (an allocation refused outright, for instance).
    """
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        line = child.stdout.readline()
        while line and not line.startswith("start "):
            line = child.stdout.readline()
        limit = int(line.split()[1]) + cap if line else None
        while limit is not None and child.poll() is None:
            resident = status_bytes("VmRSS", child.pid)
            if resident is not None and resident > limit:
                child.kill()
                child.wait()
                return "over_cap", cap
            time.sleep(0.005)
        output = child.stdout.read()
        child.wait()
        if child.returncode != 0 or limit is None:
            errors.seek(0)
            lines = errors.read().strip().splitlines() or [f"exit status {child.returncode}"]
            # Keras appends the call's arguments after the error itself, and traceback lines
            # name functions such as `error_handler`: keep the lines that raise an exception.
            named = [line for line in lines if EXCEPTION_LINE.match(line)]
            return "failed", (named or lines)[-1]
    return "measured", json.loads(output.strip().splitlines()[-1])


def measure_in_children(command, processes, env, cap, label):
    """Run `command` in `processes` children, one after the other, as `run_child` does, and
    print each measured child's line, after `label`, as it ends.

    Returns `("measured", [record of each child])`, or the first child's `("over_cap", cap)` or
    `("failed", message)`: the children that would follow it run the same step.
    """
    measured = []
    for _ in range(processes):
        outcome, value = run_child(command, env, cap)
        if outcome != "measured":
            return outcome, value
        print(f"{label} {describe(value)}", flush=True)
        measured.append(value)
    return "measured", measured


def describe(child):
    """One child's record as a line of the progress log, in MiB."""
    extra = ""
    if "planned" in child:
        extra += f"; XLA's plan: {child['planned'] / 2**20:.1f} MiB"
    if "resident_peak" in child:
        extra += f"; resident: {child['resident_peak'] / 2**20:.1f} MiB"
    steps_mib = ", ".join(f"{peak / 2**20:.1f}" for peak in child["peaks"])
    return (
        f"{child['peak'] / 2**20:10.1f} MiB {child['memory']} (steps: {steps_mib}; first call, "
        f"tracing included: {child['first_call'] / 2**20:.1f} MiB{extra})"
    )


def summarise(measured):
    """The children's records of one (contender, length) as the figures reported: the median
    peak, the least and the most peak of any step, and the medians of the other figures."""
    every = [peak for child in measured for peak in child["peaks"]]
    summary = {
        "peak": statistics.median(child["peak"] for child in measured),
        "least": min(every),
        "most": max(every),
        "first_call": statistics.median(child["first_call"] for child in measured),
    }
    for key in ("planned", "resident_peak"):
        if key in measured[0]:
            summary[key] = statistics.median(child[key] for child in measured)
    return summary


def growth_per_doubling(row):
    """The largest ratio of a length's figure to half that length's, or None without a pair."""
    lengths = sorted(row)
    growth = [row[2 * t] / row[t] for t in lengths if 2 * t in row and row[t] > 0]
    return max(growth) if growth else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--only", nargs="+", choices=MEASURED)
    parser.add_argument(
        "--processes", type=int, default=3, help="fresh processes per contender and length"
    )
    parser.add_argument("--xla", action="store_true", help="tf.function(jit_compile=True)")
    parser.add_argument(
        "--cap-gib", type=float, default=10.0, help="stop a child that grows past this"
    )
    parser.add_argument("--child", nargs=2, metavar=("NAME", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    if args.cap_gib <= 0:
        parser.error(f"--cap-gib must be positive. Received: {args.cap_gib}")
    if args.processes < 1:
        parser.error(f"--processes must be at least 1. Received: {args.processes}")
    require_backend(parser, "memory")
    refuse_xla_off_tensorflow(parser, args.xla)
    if keras.backend.backend() == "jax":
        # JAX takes 75% of a GPU's memory the first time it uses it. This process only checks
        # correctness; the device is for the measuring children.
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if args.child:
        name, steps = args.child[0], int(args.child[1])
        print(json.dumps(measure(name, steps, args.batch, args.heads, args.key_dim, args.xla)))
        return 0

    names = args.only or MEASURED
    errors = oracle_error({name: CONTENDERS[name] for name in names})
    if refuse_if_wrong(errors):
        return 1
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TF_CPP_MIN_LOG_LEVEL="3")
    shape = ["--batch", str(args.batch), "--heads", str(args.heads)]
    shape += ["--key-dim", str(args.key_dim)] + (["--xla"] if args.xla else [])
    cap = int(args.cap_gib * 2**30)
    tables = ("peak", "least", "most", "first_call", "planned", "resident_peak")
    results = {table: {name: {} for name in names} for table in tables}
    children = {name: {} for name in names}
    kinds = set()
    over_cap = {name: {} for name in names}
    failed = {name: {} for name in names}
    for steps in args.lengths:
        for name in names:
            command = [sys.executable, "-m", "benchmarks.memory", "--child", name, str(steps)]
            label = f"T={steps:6d} {name:12s}"
            outcome, value = measure_in_children(
                [*command, *shape], args.processes, env, cap, label
            )
            if outcome == "over_cap":
                over_cap[name][steps] = value
                print(f"{label} > {value / 2**20:8.0f} MiB (stopped)", flush=True)
                continue
            if outcome == "failed":
                failed[name][steps] = value
                print(f"{label} failed: {value}", flush=True)
                continue
            children[name][steps] = value
            kinds.update(child["memory"] for child in value)
            for key, figure in summarise(value).items():
                results[key][name][steps] = figure

    print(
        f"\npeak working memory of one forward+backward step (MiB, {', '.join(sorted(kinds))}, "
        f"{compile_mode(args.xla)}): the median over {args.processes} processes "
        "[the least and the most of any step]"
    )
    for name in names:
        row = results["peak"][name]
        cells = [
            f"T={t}: {row[t] / 2**20:.1f} [{results['least'][name][t] / 2**20:.1f}-"
            f"{results['most'][name][t] / 2**20:.1f}]"
            for t in sorted(row)
        ]
        cells += [f"T={t}: > {over_cap[name][t] / 2**20:.0f}" for t in sorted(over_cap[name])]
        growth = [growth_per_doubling(results[table][name]) for table in ("peak", "least", "most")]
        worst = ""
        if growth[0] is not None:
            worst = "; worst growth per doubling {:.2f}x (least {:.2f}x, most {:.2f}x)".format(
                *growth
            )
        print(f"{name:12s} " + ", ".join(cells) + worst)

    record = {
        "protocol": {k: v for k, v in vars(args).items() if k != "child"}
        | {"memory": sorted(kinds), "compilation": compile_mode(args.xla)},
        "machine": machine(),
        "oracle_max_error": max(errors.values(), default=0.0),
        "oracle_errors": errors,
        "peak_bytes": results["peak"],
        "least_peak_bytes": results["least"],
        "most_peak_bytes": results["most"],
        "first_call_bytes": results["first_call"],
        "planned_bytes": results["planned"],
        "resident_peak_bytes": results["resident_peak"],
        "children": children,
        "over_cap_bytes": over_cap,
        "failed": failed,
    }
    write_json(record, args.output_dir, "memory.json", indent=2)
    plot(results, over_cap, args, os.path.join(args.output_dir, "memory.png"))
    print(f"wrote {args.output_dir}/memory.json and memory.png")
    return 0


def plot(results, over_cap, args, path):
    def mib(table):
        return {name: {t: peak / 2**20 for t, peak in row.items()} for name, row in table.items()}

    least, most = mib(results["least"]), mib(results["most"])
    plot_against_length(
        mib(results["peak"]),
        path,
        "peak working memory, MiB",
        f"One layer, forward+backward, batch {args.batch}, width {args.heads * args.key_dim}, "
        f"{compile_mode(args.xla)} ({device()})",
        lower_bounds=mib(over_cap),
        ranges={name: {t: (least[name][t], most[name][t]) for t in least[name]} for name in least},
    )


if __name__ == "__main__":
    sys.exit(main())
