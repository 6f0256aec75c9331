"""Forward+backward time of one sequence layer: Aaren against the layers a user would pick instead.

Run (defaults: batch 8, width 64, 4 heads of 16, float32):

    python -m benchmarks.layers                                   # T = 64 ... 16384
    python -m benchmarks.layers --lengths 64 256 --repeats 3      # a quick look
    python -m benchmarks.layers --xla                             # tf.function(jit_compile=True)
    KERAS_BACKEND=jax python -m benchmarks.layers                 # jax.jit, on JAX's default device

Each contender is one layer called on `(batch, T, width)` inside a compiled function that
computes the output, a sum-of-squares loss and the gradients with respect to the input and the
weights: a `tf.function` on TensorFlow, `jax.jit` of `jax.grad` over the layer's
`stateless_call` on JAX (always XLA; each call waits for the device to finish). Each function is
traced and run twice before timing. Then, per length, the contenders are timed in turns: each of
`--repeats` rounds times one step of every contender, starting one contender further along each
round, so that a slow spell of a shared machine falls on all of them alike. The table reports
each contender's median and its time divided by Aaren's; the JSON keeps every sample and each
step's median count of minor page faults.

Contenders:

* `aaren`: `keras_aaren.Aaren` (method `auto`, the chunked scan);
* `aaren_associative`: the same layer with the paper's `keras.ops.associative_scan`;
* `tfp_style`: Aaren's projections around one associative scan over the concatenated
  `[m, u, w]` tensor, with no chunking, as a TFP-style implementation computes the prefix;
* `mha_causal`: `keras.layers.MultiHeadAttention(4, 16)` self-attention, `use_causal_mask=True`;
* `rnn_cell`: `keras.layers.RNN(AarenCell)`, stepping Aaren's cell token by token;
* `lstm`: `keras.layers.LSTM(64, return_sequences=True)`.

Two references run only when `--only` names them. Each is Aaren's own projections around a
cheaper prefix, to show how much of Aaren's step is its scan:

* `cumsum_prefix`: the softmax prefix as two `keras.ops.cumsum`, without the running max (exact
  only for scores below about 88, which the benchmark's weights give);
* `projections_only`: no prefix, each value times its own score: what the step costs around any
  scan.

Stepping and causal attention stop at `MAX_LENGTH` (4096) unless `--max-length NAME=T` says
otherwise, as on a GPU with room for causal attention's scores at 8192.

It refuses to report (exit status 1) if a contender that computes Aaren's attention does not
match the naive softmax oracle on a small case first. Results go to `<output-dir>/layers.json`
and `<output-dir>/layers.png`.
"""

import argparse
import statistics
import sys

from benchmarks.common import (
    CONTENDERS,
    compile_mode,
    device,
    in_turns,
    machine,
    oracle_error,
    plot_against_length,
    refuse_if_wrong,
    refuse_xla_off_tensorflow,
    require_backend,
    timed,
    train_step_on,
    write_json,
)

# The longest length each slow contender runs at by default; beyond it, it is left out rather
# than waited for. Stepping is sequential in T; causal attention's (B, H, T, T) float32 scores
# alone are 8.6 GB at the default shape and T = 8192, and its backward holds several of them.
MAX_LENGTH = {"rnn_cell": 4096, "mha_causal": 4096}


def time_in_turns(runs, repeats):
    """Median ms of each step, the steps timed in turns after two untimed calls each.

    Args:
        runs: `{name: run}`, each `run()` one compiled step that waits for its result.
        repeats: rounds; each times one call of every step.

    Returns:
        `{name: median ms}`, `{name: [ms of every round]}` and `{name: median minor page faults
        per call}`.
    """
    for run in runs.values():
        for _ in range(2):
            run()
    samples = {name: [] for name in runs}
    faults = {name: [] for name in runs}
    for name in in_turns(runs, repeats):
        ms, count = timed(runs[name])
        samples[name].append(ms)
        faults[name].append(count)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return medians, samples, {name: statistics.median(f) for name, f in faults.items()}


def parse_args(argv, contenders):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--xla", action="store_true", help="tf.function(jit_compile=True)")
    parser.add_argument(
        "--only", nargs="+", choices=list(contenders), help="run only these contenders"
    )
    parser.add_argument(
        "--max-length",
        nargs="+",
        default=[],
        metavar="NAME=T",
        help=f"the longest T for a contender (defaults: {MAX_LENGTH})",
    )
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1. Received: {args.repeats}")
    args.max_length = MAX_LENGTH | parse_max_length(parser, args.max_length, contenders)
    require_backend(parser, "layers")
    refuse_xla_off_tensorflow(parser, args.xla)
    return args


def parse_max_length(parser, items, contenders):
    """`["mha_causal=8192", ...]` as `{"mha_causal": 8192}`, or a parser error naming the item."""
    limits = {}
    for item in items:
        name, _, steps = item.partition("=")
        if name not in contenders or not steps.isdigit() or int(steps) < 1:
            parser.error(
                "--max-length takes NAME=T, NAME one of "
                f"{', '.join(contenders)} and T a positive integer. Received: {item!r}"
            )
        limits[name] = int(steps)
    return limits


def main(argv=None, contenders=None):
    """Run the benchmark; return the exit status (1 when it refuses to report).

    Args:
        argv: command-line arguments, `sys.argv[1:]` by default.
        contenders: `{name: benchmarks.common.Contender}` to choose from, `CONTENDERS` by
            default: a layer of your own is timed beside the others by adding it here.
    """
    contenders = CONTENDERS if contenders is None else contenders
    args = parse_args(argv, contenders)
    names = args.only or [name for name, c in contenders.items() if not c.reference]
    chosen = {name: contenders[name] for name in names}

    errors = oracle_error(chosen)
    if refuse_if_wrong(errors):
        return 1
    width = args.heads * args.key_dim
    results = {name: {} for name in chosen}
    samples = {name: {} for name in chosen}
    faults = {name: {} for name in chosen}
    for steps in args.lengths:
        runs = {
            name: train_step_on(
                contender.build(args.heads, args.key_dim), args.batch, steps, width, args.xla
            )
            for name, contender in chosen.items()
            if steps <= args.max_length.get(name, steps)
        }
        medians, times, counts = time_in_turns(runs, args.repeats)
        for name, ms in medians.items():
            results[name][steps] = ms
            samples[name][steps] = times[name]
            faults[name][steps] = counts[name]
            print(
                f"T={steps:6d} {name:18s} {ms:10.2f} ms  {counts[name]:9.0f} page faults",
                flush=True,
            )

    mode = compile_mode(args.xla)
    print(
        f"\nforward+backward, median of {args.repeats} (ms), {mode} on {device()}; "
        "ratio = time / aaren's"
    )
    print("contender           " + "".join(f"{f'T={t}':>20s}" for t in args.lengths))
    for name, row in results.items():
        cells = []
        for t in args.lengths:
            if t not in row:
                cells.append(f"{'-':>20s}")
                continue
            ratio = row[t] / results["aaren"][t] if "aaren" in results else float("nan")
            cells.append(f"{row[t]:10.1f} ({ratio:6.2f}x)")
        print(f"{name:20s}" + "".join(cells))

    record = {
        "protocol": vars(args)
        | {
            "width": width,
            "oracle_max_error": max(errors.values(), default=0.0),
            "oracle_errors": errors,
            "compile": mode,
        },
        "machine": machine(),
        "median_ms": results,
        "samples_ms": samples,
        "page_faults_per_step": faults,
    }
    write_json(record, args.output_dir, "layers.json", indent=2)
    plot_against_length(
        results,
        f"{args.output_dir}/layers.png",
        "forward+backward, ms (median)",
        f"One layer, batch {args.batch}, {args.heads} heads of {args.key_dim} ({mode}, {device()})",
    )
    print(f"wrote {args.output_dir}/layers.json and layers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
