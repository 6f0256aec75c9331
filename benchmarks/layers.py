"""Forward+backward time of one sequence layer: Aaren against the layers a user would pick instead.

Run (defaults: batch 8, width 64, 4 heads of 16, float32, T = 64 ... 16384):

    python -m benchmarks.layers                             # tf.function, Keras' default on a CPU
    python -m benchmarks.layers --jit-compile               # tf.function(jit_compile=True)
    KERAS_BACKEND=jax python -m benchmarks.layers           # jax.jit, on JAX's default device
    KERAS_BACKEND=torch python -m benchmarks.layers         # eager, Keras' default on PyTorch
    KERAS_BACKEND=torch python -m benchmarks.layers --jit-compile   # torch.compile
    python -m benchmarks.layers --lengths 64 1024 4096 --only aaren projections_only mha_causal lstm

Each contender is one layer on `(batch, T, width)` in a step that computes the output, a
sum-of-squares loss and the gradients of the input and the weights, compiled as Keras' `fit`
compiles its step (`benchmarks.common.train_step`; `torch.compile` compiles every contender at
every length, which takes minutes on a CPU). After two untimed calls, the contenders are timed
in turns, one call each per round for `--repeats` rounds; the table gives medians and each time
over Aaren's. Contenders: `aaren` (`keras_aaren.Aaren`, the chunked scan); `aaren_associative`
(the paper's `keras.ops.associative_scan`); `tfp_style` (Aaren's projections around one
associative scan over the concatenated `[m, u, w]`, as a TFP-style implementation computes it);
`mha_causal` (`keras.layers.MultiHeadAttention(4, 16)`, `use_causal_mask=True`); `rnn_cell`
(`keras.layers.RNN(AarenCell)`, stepping); `lstm` (`keras.layers.LSTM(64)`); and, only when
`--only` names it, `projections_only`: Aaren's projections around no prefix at all (each value
times its own score), what the step costs around any scan, with Aaren ÷ `projections_only`.
Stepping and causal attention stop at T = 4096 unless `--max-length NAME=T` says otherwise
(causal attention's scores alone are 8.6 GB at the default shape and T = 8192).

It refuses to report (exit status 1) if a contender that computes Aaren's attention does not
match the naive softmax oracle first. Results go to `<output-dir>/layers.json` and `layers.png`.
"""

import statistics
import sys

from benchmarks import common

MAX_LENGTH = {"rnn_cell": 4096, "mha_causal": 4096}


def parse_args(argv, contenders):
    parser = common.parser(__doc__, ("tensorflow", "jax", "torch"), jit_compile="the step")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", nargs="+", choices=list(contenders))
    parser.add_argument("--max-length", nargs="+", default=[], metavar="NAME=T")
    args = common.parse(parser, argv, "lengths", "batch", "heads", "key_dim", "repeats")
    limits = dict(MAX_LENGTH)
    for item in args.max_length:
        name, _, steps = item.partition("=")
        if name not in contenders or not steps.isdigit() or int(steps) < 1:
            parser.error(
                f"--max-length takes NAME=T, NAME one of {', '.join(contenders)} and T a "
                f"positive integer. Received: {item!r}"
            )
        limits[name] = int(steps)
    args.max_length = limits
    return args


def main(argv=None, contenders=None):
    """Run the benchmark; return the exit status (1 when it refuses to report).

    Args:
        argv: command-line arguments, `sys.argv[1:]` by default.
        contenders: `{name: benchmarks.common.Contender}` to choose from, `CONTENDERS` by
            default: a layer of your own is timed beside the others by adding it here.
    """
    contenders = common.CONTENDERS if contenders is None else contenders
    args = parse_args(argv, contenders)
    names = args.only or [name for name, c in contenders.items() if not c.reference]
    errors = common.oracle_error({name: contenders[name] for name in names})
    if common.refuse_if_wrong(errors):
        return 1
    width, mode = args.heads * args.key_dim, common.compile_mode(args.jit_compile)
    samples = {name: {} for name in names}
    for steps in args.lengths:
        runs = {
            name: common.train_step(
                contenders[name].build(args.heads, args.key_dim),
                args.batch,
                steps,
                width,
                args.jit_compile,
            )
            for name in names
            if steps <= args.max_length.get(name, steps)
        }
        for name, seconds in common.time_in_turns(runs, args.repeats, warmup=2).items():
            samples[name][steps] = [1000 * s for s in seconds]
            print(f"T={steps:6d} {name:18s} {statistics.median(seconds) * 1000:10.2f} ms")
    results = {n: {t: statistics.median(ms) for t, ms in row.items()} for n, row in samples.items()}

    print(f"\nforward+backward, median of {args.repeats} (ms), {mode} on {common.device()}")
    print(f"{'contender':20s}" + "".join(f"{f'T={t}':>22s}" for t in args.lengths))
    for name, row in results.items():
        cells = [
            f"{row[t]:10.2f} ({row[t] / results['aaren'][t]:6.2f}x)"
            if t in row and t in results.get("aaren", {})
            else f"{row.get(t, float('nan')):10.2f}"
            for t in args.lengths
        ]
        print(f"{name:20s}" + "".join(f"{cell:>22s}" for cell in cells))
    if "aaren" in results and "projections_only" in results:
        floor = results["projections_only"]
        ratios = [f"{results['aaren'][t] / floor[t]:.2f}" for t in args.lengths if t in floor]
        print(f"aaren / projections_only: {' / '.join(ratios)}")
    record = {
        "protocol": vars(args) | {"width": width, "compile": mode, "oracle_errors": errors},
        "machine": common.machine(),
        "median_ms": results,
        "samples_ms": samples,
    }
    common.write_json(record, args.output_dir, "layers.json")
    title = f"One layer, batch {args.batch}, {args.heads} heads of {args.key_dim}"
    common.plot_against_length(
        results,
        f"{args.output_dir}/layers.png",
        "forward+backward, ms (median)",
        f"{title} ({mode}, {common.device()})",
    )
    print(f"wrote {args.output_dir}/layers.json and layers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
