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
* `transformer_kv`: four post-norm causal self-attention blocks (the AarenBlock's layout, with
  an input-dependent query) decoding with a KV cache: each token appends its keys and values and
  attends over all of them, so its cost grows with the position. It stays a plain `tf.function`
  with `--xla` too: its reads grow by one entry per token, a shape XLA would recompile for.

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
import time

import keras
import numpy as np

from benchmarks.common import (
    in_turns,
    machine,
    pyplot,
    refuse_if_wrong,
    require_backend,
    sequence_model,
    status_bytes,
    write_json,
)
from keras_aaren.streaming import make_step_function

# The token (counted from 1) whose latency stands for the start of the stream.
START = 16
# The Keras models served through a step function, by name.
KERAS_MODELS = ("aaren", "lstm")


class KerasStream:
    """A Keras model served one token per call through `make_step_function`."""

    def __init__(self, model, jit_compile=None, step_function=make_step_function):
        self.step = step_function(model, batch_size=1, jit_compile=jit_compile)
        self.reset()

    def reset(self):
        self.states = self.step.initial_states()

    def state_bytes(self, tokens):
        return sum(keras.ops.convert_to_numpy(s).nbytes for s in self.states)

    def __call__(self, x):
        y, self.states = self.step(x, self.states)
        return keras.ops.convert_to_numpy(y)

    def snapshot(self):
        return list(self.states)

    def time_from(self, snapshot, x):
        """Seconds for one token from a saved state, leaving the stream's state alone."""
        start = time.perf_counter()
        y, _ = self.step(x, snapshot)
        keras.ops.convert_to_numpy(y)
        return time.perf_counter() - start


class KVCacheTransformer:
    """Causal self-attention blocks decoding one token at a time with a key/value cache."""

    def __init__(self, width, heads, depth, capacity, seed=0):
        import tensorflow as tf

        self.width, self.heads, self.depth = width, heads, depth
        rng = np.random.default_rng(seed)

        def weight(*shape):
            return tf.constant(rng.normal(size=shape) / np.sqrt(shape[0]), tf.float32)

        self.blocks = [
            {
                "qkv": weight(width, 3 * width),
                "out": weight(width, width),
                "ffn_in": weight(width, 4 * width),
                "ffn_out": weight(4 * width, width),
            }
            for _ in range(depth)
        ]
        # The cache is allocated once at its capacity; a token at position t reads only the
        # first t + 1 entries, as a growing cache would. One variable per layer and per keys or
        # values: a write into a variable that a pending read still aliases copies all of it.
        self.cache = [
            [tf.Variable(tf.zeros((capacity, heads, width // heads))) for _ in range(2)]
            for _ in range(depth)
        ]
        self.position = tf.Variable(0)
        self.step = tf.function(self._step)

    def __call__(self, x):
        return self.step(x).numpy()

    def reset(self):
        import tensorflow as tf

        for variable in (v for layer in self.cache for v in layer):
            variable.assign(tf.zeros_like(variable))
        self.position.assign(0)

    def state_bytes(self, tokens):
        return 2 * self.depth * tokens * self.width * 4

    def snapshot(self):
        return int(self.position.numpy())

    def time_from(self, snapshot, x):
        """Seconds for the token at position `snapshot`: it reads that many cached entries."""
        # The cache past the position is never read, so rewinding the position is enough; the
        # write at the position only rewrites an entry of the stream that was served.
        self.position.assign(snapshot)
        start = time.perf_counter()
        self.step(x).numpy()
        return time.perf_counter() - start

    def parallel(self, x):
        """The blocks over a whole `(T, width)` sequence at once, with a causal mask."""
        import tensorflow as tf

        heads, dim = self.heads, self.width // self.heads
        steps = tf.shape(x)[0]
        causal = tf.linalg.band_part(tf.ones((steps, steps), tf.bool), -1, 0)  # (T, T)
        for block in self.blocks:
            q, k, v = (
                tf.reshape(t, (steps, heads, dim))
                for t in tf.split(tf.matmul(x, block["qkv"]), 3, axis=-1)
            )
            logits = tf.einsum("shd,thd->hst", q, k) / dim**0.5
            logits = tf.where(causal, logits, tf.float32.min)
            attended = tf.einsum("hst,thd->shd", tf.nn.softmax(logits, axis=-1), v)
            x = _layer_norm(x + tf.matmul(tf.reshape(attended, (steps, -1)), block["out"]))
            ffn = tf.matmul(tf.nn.relu(tf.matmul(x, block["ffn_in"])), block["ffn_out"])
            x = _layer_norm(x + ffn)
        return x

    def _step(self, x):
        import tensorflow as tf

        heads, dim = self.heads, self.width // self.heads
        t = self.position
        for i, block in enumerate(self.blocks):
            q, k, v = tf.split(tf.matmul(x, block["qkv"]), 3, axis=-1)
            key_cache, value_cache = self.cache[i]
            key_cache[t].assign(tf.reshape(k, (heads, dim)))
            value_cache[t].assign(tf.reshape(v, (heads, dim)))
            keys = key_cache[: t + 1]  # (t + 1, H, D)
            values = value_cache[: t + 1]
            logits = tf.einsum("hd,thd->ht", tf.reshape(q, (heads, dim)), keys) / dim**0.5
            attended = tf.einsum("ht,thd->hd", tf.nn.softmax(logits, axis=-1), values)
            x = _layer_norm(x + tf.matmul(tf.reshape(attended, (1, -1)), block["out"]))
            ffn = tf.matmul(tf.nn.relu(tf.matmul(x, block["ffn_in"])), block["ffn_out"])
            x = _layer_norm(x + ffn)
        self.position.assign_add(1)
        return x


def _layer_norm(x):
    import tensorflow as tf

    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + 1e-5)


def stepping_errors(width, heads, step_function=make_step_function, tokens=40):
    """How far stepping each model one token at a time is from running it over the whole
    sequence at once, on `tokens` random tokens: `{name: max absolute difference}`.

    The Keras models (two layers each) are stepped through `step_function`; the KV-cache
    Transformer is compared with its own causal attention over the sequence, same weights.
    """
    x = np.random.default_rng(0).normal(size=(1, tokens, width)).astype("float32")
    errors = {}
    for kind in KERAS_MODELS:
        model = sequence_model(kind, width, heads, depth=2)
        run = KerasStream(model, step_function=step_function)
        stepped = np.stack([run(x[:, t]) for t in range(tokens)], axis=1)
        errors[kind] = float(np.abs(stepped - keras.ops.convert_to_numpy(model(x))).max())
    transformer = KVCacheTransformer(width, heads, depth=2, capacity=tokens)
    stepped = np.concatenate([transformer(x[:, t]) for t in range(tokens)])
    errors["transformer_kv"] = float(np.abs(stepped - transformer.parallel(x[0]).numpy()).max())
    return errors


def stream(run, tokens, width, keep_at, seed=0):
    """Per-token latency (s) and resident memory (bytes) while serving `tokens` tokens, and the
    runner's snapshots before the tokens at the positions `keep_at` (0-based)."""
    xs = np.random.default_rng(seed).normal(size=(tokens, 1, width)).astype("float32")
    latencies, resident = np.empty(tokens), np.empty(tokens)
    kept = {}
    for t in range(tokens):
        if t in keep_at:
            kept[t] = run.snapshot()
        start = time.perf_counter()
        run(xs[t])
        latencies[t] = time.perf_counter() - start
        resident[t] = status_bytes("VmRSS")
    return latencies, resident, kept


def latencies_at(runners, snapshots, width, rounds, calls, seed=1):
    """Median seconds per token of each (runner, position), timed in turns from saved states."""
    xs = np.random.default_rng(seed).normal(size=(calls, 1, width)).astype("float32")
    keys = [(name, where) for name in runners for where in snapshots[name]]
    samples = {key: [] for key in keys}
    for name, where in in_turns(keys, rounds):
        run, saved = runners[name], snapshots[name][where]
        samples[name, where] += [run.time_from(saved, x) for x in xs]
    return {key: statistics.median(times) for key, times in samples.items()}


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
    # Its KV-cache Transformer is written in TensorFlow.
    require_backend(parser, "streaming", ("tensorflow",))
    errors = stepping_errors(args.width, args.heads, step_function)
    if refuse_if_wrong(errors, "its whole-sequence run when stepped"):
        return 1

    runners = {
        kind: KerasStream(
            sequence_model(kind, args.width, args.heads, args.depth),
            jit_compile=args.xla or None,
            step_function=step_function,
        )
        for kind in KERAS_MODELS
    }
    runners["transformer_kv"] = KVCacheTransformer(
        args.width, args.heads, args.depth, capacity=args.tokens
    )

    # The states before token START and before the last token, as 0-based positions.
    positions = {"start": START - 1, "end": args.tokens - 1}
    results, snapshots = {}, {}
    for name, run in runners.items():
        for _ in range(3):
            run(np.zeros((1, args.width), "float32"))
        run.reset()
        latencies, resident, kept = stream(run, args.tokens, args.width, positions.values())
        snapshots[name] = {where: kept[t] for where, t in positions.items()}
        results[name] = {
            "state_bytes_start": run.state_bytes(START),
            "state_bytes_end": run.state_bytes(args.tokens),
            "resident_mb_start": resident[START - 1] / 2**20,
            "resident_mb_end": resident[-1] / 2**20,
            "cumulative_s": np.cumsum(latencies).tolist(),
        }
    medians = latencies_at(runners, snapshots, args.width, args.rounds, args.window)
    for name, row in results.items():
        row["p50_start_ms"] = 1000 * medians[name, "start"]
        row["p50_end_ms"] = 1000 * medians[name, "end"]
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
    plot(results, runners, args, os.path.join(args.output_dir, "streaming.png"))
    print(f"wrote {args.output_dir}/streaming.json and streaming.png")
    return 0


def plot(results, runners, args, path):
    plt = pyplot()
    tokens = np.arange(1, args.tokens + 1)
    fig, (memory, elapsed) = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in results.items():
        sizes = [runners[name].state_bytes(t) for t in tokens]
        memory.plot(tokens, np.asarray(sizes) / 2**10, label=name)
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
