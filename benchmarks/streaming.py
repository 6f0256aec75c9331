"""Serving one token at a time: Aaren blocks against a KV-cache Transformer and an LSTM stack.

Run (defaults: 4 layers of width 64, 4 heads of 16, one stream; TensorFlow):

    python -m benchmarks.streaming                       # 16384 tokens
    python -m benchmarks.streaming --tokens 2048         # a quick look
    python -m benchmarks.streaming --xla                 # XLA for the aaren and lstm steps

Three models of the same width and depth serve one stream, a token per call, each call a
`tf.function` traced once (no XLA) and each token's output fetched before the next is sent:

* `aaren`: four `AarenBlock`s, served by `keras_aaren.streaming.make_step_function`; the state
  is a fixed set of tensors;
* `lstm`: four `keras.layers.LSTM` layers, served the same way;
* `transformer_kv`: four post-norm blocks of causal `keras.layers.MultiHeadAttention` (the
  AarenBlock's layout, with an input-dependent query; `benchmarks.common.transformer_model`, the
  model `benchmarks.edge` exports) decoding with a KV cache: each call takes the cache, attends
  over it and the token, and returns it grown by the token's keys and values, so its cost grows
  with the position. It stays a plain `tf.function` with `--xla` too: its cache grows by one
  entry per token, a shape XLA would compile again for.

Reported per model: the median per-token latency at token 16 and at the last token, the state
(or cache) in bytes, and the process's resident memory as the stream goes. The latencies are
not read off the stream: a shared machine has slow spells that last hundreds of tokens, and one
falling on either end of the stream would pass for a cost that changes with the position. The
state before token 16 and before the last token are kept, and after the stream every model
steps from each of them in turns: `--rounds` rounds of `--window` calls, each round starting
one (model, position) further along, as `benchmarks.layers` times its contenders. This
reproduces the efficiency figure of Feng et al. (memory and cumulative time against tokens).

It refuses to report (exit status 1) unless, on a short sequence, stepping each model
reproduces the same model run over the whole sequence at once. Results go to
`<output-dir>/streaming.json` and `<output-dir>/streaming.png`.
"""

import argparse
import os
import statistics
import sys

import numpy as np

from benchmarks.common import (
    kv_cache_step_function,
    machine,
    pyplot,
    refuse_if_wrong,
    require_backend,
    sequence_model,
    serve,
    step_latencies,
    to_host,
    write_json,
)
from keras_aaren.streaming import make_step_function

# The token (counted from 1) whose latency stands for the start of the stream.
START = 16
# The models served, by name: the first two through `step_function`, the last with its cache.
KINDS = ("aaren", "lstm", "transformer_kv")


def served_step(kind, model, step_function, jit_compile=None):
    """`(step, initial states)` serving `model` one token per call, batch 1."""
    if kind == "transformer_kv":
        step = kv_cache_step_function(model)
    else:
        step = step_function(model, batch_size=1, jit_compile=jit_compile)
    return step, step.initial_states()


def stepping_errors(width, heads, step_function=make_step_function, tokens=40):
    """How far stepping each model one token at a time is from running it over the whole
    sequence at once, on `tokens` random tokens: `{name: max absolute difference}`.

    The models have two layers each; the Keras models are stepped through `step_function`, the
    KV-cache Transformer through its cache.
    """
    x = np.random.default_rng(0).normal(size=(1, tokens, width)).astype("float32")
    errors = {}
    for kind in KINDS:
        model = sequence_model(kind, width, heads, depth=2)
        stepped = serve(*served_step(kind, model, step_function), x.swapaxes(0, 1)).outputs
        whole = to_host(model(x))
        errors[kind] = float(np.abs(stepped.swapaxes(0, 1) - whole).max())
    return errors


def main(argv=None, step_function=make_step_function):
    """Run the benchmark; return the exit status (1 when it refuses to report).

    Args:
        argv: command-line arguments, `sys.argv[1:]` by default.
        step_function: serves a Keras model one token per call, with the signature and result
            of `keras_aaren.streaming.make_step_function` (the default).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--window", type=int, default=64, help="calls per turn of the timing")
    parser.add_argument("--rounds", type=int, default=9, help="turns of the timing per position")
    parser.add_argument(
        "--xla", action="store_true", help="compile the aaren and lstm steps with XLA"
    )
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    for name in ("window", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1. Received: {getattr(args, name)}")
    if args.tokens <= START:
        parser.error(f"--tokens must be more than {START}. Received: {args.tokens}")
    # Only a tf.function steps the KV cache compiled once for every length; a jax.jit would
    # compile again at every token.
    require_backend(parser, "streaming", ("tensorflow",))
    errors = stepping_errors(args.width, args.heads, step_function)
    if refuse_if_wrong(errors, "its whole-sequence run when stepped"):
        return 1

    # The states before token START and before the last token, as 0-based positions.
    positions = {"start": START - 1, "end": args.tokens - 1}
    xs = np.random.default_rng(0).normal(size=(args.tokens, 1, args.width)).astype("float32")
    results, served = {}, {}
    for kind in KINDS:
        model = sequence_model(kind, args.width, args.heads, args.depth)
        step, states = served_step(kind, model, step_function, args.xla or None)
        serve(step, states, xs[:3])  # traced and compiled before the stream
        run = serve(step, states, xs, set(positions.values()), record_memory=True)
        for where, t in positions.items():
            served[kind, where] = (step, run.kept[t])
        results[kind] = {
            "state_bytes_start": int(run.state_bytes[START - 1]),
            "state_bytes_end": int(run.state_bytes[-1]),
            "resident_mb_start": run.resident[START - 1] / 2**20,
            "resident_mb_end": run.resident[-1] / 2**20,
            "cumulative_s": np.cumsum(run.latencies).tolist(),
            "state_bytes": run.state_bytes.tolist(),
        }
    samples = step_latencies(served, args.width, args.rounds, args.window)
    for name, row in results.items():
        row["p50_start_ms"] = 1000 * statistics.median(samples[name, "start"])
        row["p50_end_ms"] = 1000 * statistics.median(samples[name, "end"])
        print(
            f"{name:15s} p50 at token {START}: {row['p50_start_ms']:6.3f} ms, at token "
            f"{args.tokens}: {row['p50_end_ms']:6.3f} ms "
            f"({row['p50_end_ms'] / row['p50_start_ms']:5.2f}x); state "
            f"{row['state_bytes_start']} -> {row['state_bytes_end']} bytes; resident "
            f"{row['resident_mb_start']:.0f} -> {row['resident_mb_end']:.0f} MiB",
            flush=True,
        )
    ratio = results["aaren"]["p50_end_ms"] / results["lstm"]["p50_end_ms"]
    print(f"aaren / lstm per-token latency at the end: {ratio:.2f}x")

    record = {
        "protocol": vars(args)
        | {"stepping_max_error": max(errors.values()), "stepping_errors": errors},
        "machine": machine(),
        "results": results,
    }
    write_json(record, args.output_dir, "streaming.json")
    plot(results, args, os.path.join(args.output_dir, "streaming.png"))
    print(f"wrote {args.output_dir}/streaming.json and streaming.png")
    return 0


def plot(results, args, path):
    plt = pyplot()
    tokens = np.arange(1, args.tokens + 1)
    fig, (memory, elapsed) = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in results.items():
        memory.plot(tokens, np.asarray(row["state_bytes"]) / 2**10, label=name)
        elapsed.plot(tokens, row["cumulative_s"], label=name)
    memory.set_xlabel("tokens")
    memory.set_ylabel("state / KV cache (KiB)")
    memory.set_title("Memory")
    elapsed.set_xlabel("tokens")
    elapsed.set_ylabel("cumulative time (s)")
    elapsed.set_title("Cumulative time")
    for ax in (memory, elapsed):
        ax.legend()
    compiled = "XLA for aaren and lstm" if args.xla else "tf.function"
    fig.suptitle(
        f"Streaming, {args.depth} layers of width {args.width}, one token per call ({compiled})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
