"""Peak memory of one forward+backward step: Aaren against the layers a user would pick instead.

Run (the defaults are the issue's protocol: batch 8, width 64, 4 heads of 16, float32; Linux):

    python -m benchmarks.memory                                  # T = 1024 ... 16384
    python -m benchmarks.memory --lengths 1024 2048 --only aaren lstm

Each (contender, length) runs in a fresh process: it builds the layer and the input, runs the
compiled training step of `benchmarks.layers` once (tracing and compiling it), then resets the
kernel's peak-resident counter (`/proc/self/clear_refs`), runs the step again and reports the
peak resident memory above what the process held just before: the working memory of one step,
without the compiler's. The process runs with a fixed `MALLOC_MMAP_THRESHOLD_`, so that freed
buffers go back to the system and the resident size follows what is live. A length where a
contender is left out in `benchmarks.layers` is left out here too. Results go to
`<output-dir>/memory.json` and `<output-dir>/memory.png`.
"""

import argparse
import json
import os
import subprocess
import sys

from benchmarks.layers import (
    MAX_LENGTH,
    check_correctness,
    contenders,
    machine,
    plot_against_length,
    train_step_on,
)

CONTENDERS = ("aaren", "tfp_style", "mha_causal", "lstm")


def status_bytes(field):
    """A memory field of /proc/self/status (Linux), such as VmRSS or VmHWM, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return 1024 * int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(name, steps, batch, heads, key_dim):
    """Peak bytes above the starting resident size during one compiled forward+backward."""
    make_layer = contenders(heads, key_dim, heads * key_dim)[name]
    run = train_step_on(make_layer, batch, steps, heads * key_dim)
    run()
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    return status_bytes("VmHWM") - before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS)
    parser.add_argument("--child", nargs=2, metavar=("NAME", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    if args.child:
        name, steps = args.child[0], int(args.child[1])
        print(measure(name, steps, args.batch, args.heads, args.key_dim))
        return 0

    ok, error = check_correctness()
    if not ok:
        print(f"Aaren does not match its oracle (max error {error:.2e}): not reporting.")
        return 1
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TF_CPP_MIN_LOG_LEVEL="3")
    shape = ["--batch", str(args.batch), "--heads", str(args.heads)]
    shape += ["--key-dim", str(args.key_dim)]
    results = {name: {} for name in (args.only or CONTENDERS)}
    for steps in args.lengths:
        for name in results:
            if steps > MAX_LENGTH.get(name, steps):
                continue
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", "--child", name, str(steps), *shape],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            peak = int(child.stdout.strip().splitlines()[-1])
            results[name][steps] = peak
            print(f"T={steps:6d} {name:12s} {peak / 2**20:10.1f} MiB", flush=True)

    print("\npeak working memory of one forward+backward step (MiB)")
    for name, row in results.items():
        cells = [f"T={t}: {row[t] / 2**20:.1f}" for t in sorted(row)]
        growth = [row[b] / row[a] for a, b in zip(sorted(row), sorted(row)[1:]) if b == 2 * a]
        worst = f"; worst growth per doubling {max(growth):.2f}x" if growth else ""
        print(f"{name:12s} " + ", ".join(cells) + worst)

    os.makedirs(args.output_dir, exist_ok=True)
    record = {
        "protocol": {k: v for k, v in vars(args).items() if k != "child"},
        "machine": machine(),
        "oracle_max_error": error,
        "peak_bytes": results,
    }
    with open(os.path.join(args.output_dir, "memory.json"), "w") as f:
        json.dump(record, f, indent=2)
    plot(results, args, os.path.join(args.output_dir, "memory.png"))
    print(f"wrote {args.output_dir}/memory.json and memory.png")
    return 0


def plot(results, args, path):
    plot_against_length(
        {name: {t: peak / 2**20 for t, peak in row.items()} for name, row in results.items()},
        path,
        "peak working memory, MiB",
        f"One layer, forward+backward, batch {args.batch}, width {args.heads * args.key_dim}",
    )


if __name__ == "__main__":
    sys.exit(main())
