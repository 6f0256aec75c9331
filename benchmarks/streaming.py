"""Serving one token at a time: Aaren blocks against a KV-cache Transformer and an LSTM stack.

Run (defaults: 4 layers of width 64, 4 heads of 16, one stream of 16384 tokens; TensorFlow):

    python -m benchmarks.streaming
    python -m benchmarks.streaming --jit-compile    # XLA for the aaren and lstm steps

Three models of the same width and depth serve one stream, a token per call, each call a
`tf.function` traced once and each output fetched before the next token is sent: `aaren`, four
`AarenBlock`s, and `lstm`, four `keras.layers.LSTM`s, each served by
`keras_aaren.streaming.make_step_function` with a fixed state; `transformer_kv`, four post-norm
blocks of causal `MultiHeadAttention` (the AarenBlock's layout) decoding with a KV cache that
each call returns grown by the token's keys and values. The KV-cache step stays a plain
`tf.function` under `--jit-compile`: XLA would compile again for every cache length.

Reported per model: the median latency per token at token 16 and at the last token, the state
(or cache) in bytes and the process's resident memory as the stream goes, and the cumulative
time (the efficiency figure of Feng et al.). The latencies are not read off the stream, where a
slow spell of a shared machine lasting hundreds of tokens would pass for a cost of the position:
the states before both tokens are kept, and after the stream every model steps from each of them
in turns, `--rounds` rounds of `--window` calls.

It refuses to report (exit status 1) unless, over 40 tokens, stepping each model reproduces the
same model run over the whole sequence. Results go to `<output-dir>/streaming.json` and `.png`.
"""

import os
import statistics
import sys

import numpy as np

from benchmarks import common
from keras_aaren.streaming import make_step_function

# The token (counted from 1) whose latency stands for the start of the stream.
START = 16
KINDS = ("aaren", "lstm", "transformer_kv")


def served_step(kind, model, step_function, jit_compile=None):
    """`(step, initial states)` serving `model` one token per call, batch 1."""
    if kind == "transformer_kv":
        step = common.kv_cache_step_function(model)
    else:
        step = step_function(model, batch_size=1, jit_compile=jit_compile)
    return step, step.initial_states()


def main(argv=None, step_function=make_step_function):
    """Run the benchmark; return the exit status (1 when it refuses to report).

    Args:
        argv: command-line arguments, `sys.argv[1:]` by default.
        step_function: serves a Keras model one token per call, with the signature and result
            of `keras_aaren.streaming.make_step_function` (the default).
    """
    parser = common.parser(__doc__, ("tensorflow",), jit_compile="the aaren and lstm steps")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--window", type=int, default=64, help="calls per turn of the timing")
    parser.add_argument("--rounds", type=int, default=9, help="turns of the timing per position")
    args = common.parse(parser, argv, "tokens", "width", "heads", "depth", "window", "rounds")
    if args.tokens <= START:
        parser.error(f"--tokens must be more than {START}. Received: {args.tokens}")

    # The oracle: each model of two layers, stepped over 40 tokens, against its whole-sequence run.
    x = np.random.default_rng(0).normal(size=(1, 40, args.width)).astype("float32")
    errors = {}
    for kind in KINDS:
        model = common.sequence_model(kind, args.width, args.heads, depth=2)
        stepped = common.serve(*served_step(kind, model, step_function), x.swapaxes(0, 1))
        whole = common.to_host(model(x))
        errors[kind] = float(np.abs(stepped.outputs.swapaxes(0, 1) - whole).max())
    if common.refuse_if_wrong(errors, "its whole-sequence run when stepped"):
        return 1

    positions = {"start": START - 1, "end": args.tokens - 1}  # before these tokens, 0-based
    xs = np.random.default_rng(0).normal(size=(args.tokens, 1, args.width)).astype("float32")
    results, served = {}, {}
    for kind in KINDS:
        model = common.sequence_model(kind, args.width, args.heads, args.depth)
        step, states = served_step(kind, model, step_function, args.jit_compile or None)
        common.serve(step, states, xs[:3])  # traced and compiled before the stream
        run = common.serve(step, states, xs, set(positions.values()), record_memory=True)
        for where, t in positions.items():
            served[kind, where] = (step, run.kept[t])
        results[kind] = {
            "cumulative_s": np.cumsum(run.latencies).tolist(),
            "state_bytes": run.state_bytes,
            "resident_mib_start": run.resident[START - 1] / 2**20,
            "resident_mib_end": run.resident[-1] / 2**20,
        }
    samples = common.step_latencies(served, args.width, args.rounds, args.window)
    for kind, row in results.items():
        row["p50_start_ms"] = 1000 * statistics.median(samples[kind, "start"])
        row["p50_end_ms"] = 1000 * statistics.median(samples[kind, "end"])
        print(
            f"{kind:15s} p50 at token {START}: {row['p50_start_ms']:6.3f} ms, at token "
            f"{args.tokens}: {row['p50_end_ms']:6.3f} ms "
            f"({row['p50_end_ms'] / row['p50_start_ms']:5.2f}x); state "
            f"{row['state_bytes'][START - 1]} -> {row['state_bytes'][-1]} bytes; resident "
            f"{row['resident_mib_start']:.0f} -> {row['resident_mib_end']:.0f} MiB",
            flush=True,
        )
    ratio = results["aaren"]["p50_end_ms"] / results["lstm"]["p50_end_ms"]
    print(f"aaren / lstm per-token latency at the end: {ratio:.2f}x")
    record = {
        "protocol": vars(args) | {"stepping_errors": errors},
        "machine": common.machine(),
        "results": results,
    }
    common.write_json(record, args.output_dir, "streaming.json")
    plot(results, os.path.join(args.output_dir, "streaming.png"), args)
    print(f"wrote {args.output_dir}/streaming.json and streaming.png")
    return 0


def plot(results, path, args):
    plt = common.pyplot()
    fig, (memory, elapsed) = plt.subplots(1, 2, figsize=(10, 4))
    tokens = np.arange(1, args.tokens + 1)
    for name, row in results.items():
        memory.plot(tokens, np.asarray(row["state_bytes"]) / 2**10, label=name)
        elapsed.plot(tokens, row["cumulative_s"], label=name)
    memory.set(xlabel="tokens", ylabel="state / KV cache (KiB)", title="Memory")
    elapsed.set(xlabel="tokens", ylabel="cumulative time (s)", title="Cumulative time")
    memory.legend()
    fig.suptitle(f"Streaming, {args.depth} layers of width {args.width}, one token per call")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
