"""Forward+backward time of one sequence layer: Aaren against the layers a user would pick instead.

Run (the defaults are the issue's protocol: batch 8, width 64, 4 heads of 16, float32):

    python -m benchmarks.layers                                   # T = 64 ... 16384
    python -m benchmarks.layers --lengths 64 256 --repeats 3      # a quick look
    python -m benchmarks.layers --xla                             # tf.function(jit_compile=True)
    KERAS_BACKEND=jax python -m benchmarks.layers                 # jax.jit, on JAX's default device

Each contender is one layer called on `(batch, T, width)` inside a compiled function that
computes the output, a sum-of-squares loss and the gradients with respect to the input and the
weights: a `tf.function` on TensorFlow, `jax.jit` of `jax.grad` over the layer's
`stateless_call` on JAX (always XLA; each call waits for the device to finish). Each function is
traced and run twice before timing. Then, per length, the contenders are timed
in turns: each of `--repeats` rounds times one step of every contender, so that a slow spell of a
shared machine falls on all of them alike. The table reports each contender's median and its
time divided by Aaren's, all measured in the same run; the JSON keeps every sample.

Contenders:

* `aaren`: `keras_aaren.Aaren` (method `auto`, the chunked scan);
* `aaren_associative`: the same layer with the paper's `keras.ops.associative_scan`;
* `tfp_style`: the approach of the earlier public Keras implementation, written here: one
  associative scan over the concatenated `[m, u, w]` tensor (no chunking);
* `mha_causal`: `keras.layers.MultiHeadAttention(4, 16)` self-attention, `use_causal_mask=True`;
* `rnn_cell`: `keras.layers.RNN(AarenCell)`, stepping the same weights token by token;
* `lstm`: `keras.layers.LSTM(64, return_sequences=True)`.

Two references run only when `--only` names them. Each is Aaren's own projections around a
cheaper prefix, to show how much of Aaren's step is its scan:

* `cumsum_prefix`: the softmax prefix as two `keras.ops.cumsum`, without the running max (exact
  only for scores below about 88, which the benchmark's weights give);
* `projections_only`: no prefix, each value times its own score: what the step costs around any
  scan.

Stepping and causal attention stop at `MAX_LENGTH` (4096) unless `--max-length NAME=T` says
otherwise, as on a GPU with room for causal attention's scores at 8192.

It refuses to report (exit status 1) if `Aaren` does not match stepping its cell and the naive
softmax oracle on a small case first. Results go to `<output-dir>/layers.json` and
`<output-dir>/layers.png`.

Shape letters used in this module: B batch, T timesteps, H heads, D value dimension.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import keras
import numpy as np
from keras import ops

from keras_aaren import Aaren, AarenCell
from keras_aaren.ops import aaren_attention_naive, full_precision_matmuls

# The longest length each slow contender runs at by default; beyond it, it is left out rather
# than waited for. Stepping costs seconds per call at 4096 on a CPU; causal attention's
# (B, H, T, T) scores alone take 8.6 GB at T = 8192 and its backward needs several of them, more
# than a 24 GiB machine has. `--max-length` overrides them.
MAX_LENGTH = {"rnn_cell": 4096, "mha_causal": 4096}

BACKENDS = ("tensorflow", "jax")


def tfp_style_prefix(scores, values):
    """The approach of the earlier public Keras implementation: one associative scan over the
    concatenated `[m, u, w]` tensor, with no chunking.

    `(B, T, H)` scores and `(B, T, H, D)` values -> `(B, T, H, D)` attended values.
    """
    leaves = ops.concatenate([scores[..., None], ops.ones_like(scores)[..., None], values], -1)

    def combine(a, b):
        m = ops.maximum(a[..., :1], b[..., :1])
        scale_a, scale_b = ops.exp(a[..., :1] - m), ops.exp(b[..., :1] - m)
        return ops.concatenate([m, a[..., 1:] * scale_a + b[..., 1:] * scale_b], -1)

    prefix = ops.associative_scan(combine, leaves, axis=1)
    # keras.ops.associative_scan on TensorFlow loses the rank; give the leaves' shape back.
    prefix = ops.reshape(prefix, ops.shape(leaves))
    return prefix[..., 2:] / prefix[..., 1:2]


def cumsum_prefix(scores, values):
    """Every prefix's softmax mean as two plain cumulative sums, with no running max.

    Exact only while every $e^{s}$ fits in float32 (scores below about 88): not a usable layer,
    but the prefix built on the backend's own cumulative-sum op, to set Aaren's scan beside.
    """
    weights = ops.exp(scores)  # (B, T, H)
    total = ops.cumsum(weights, axis=1)[..., None]
    return ops.cumsum(weights[..., None] * values, axis=1) / total


def no_prefix(scores, values):
    """No prefix at all: each token's value times its own score. Every scan reads the scores and
    the values and writes one output per value, so this is what the layer costs around its scan.
    """
    return values * scores[..., None]


class ProjectedPrefix(keras.layers.Layer):
    """Aaren's projections (an `AarenCell`'s weights) around another prefix over the tokens.

    `prefix` maps scores `(B, T, H)` and values `(B, T, H, D)` to the attended values
    `(B, T, H, D)`, as `aaren_scan` does in `Aaren`.
    """

    def __init__(self, num_heads, key_dim, prefix, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.prefix = prefix
        self.cell = AarenCell(num_heads, key_dim)

    def build(self, input_shape):
        self.cell.build((input_shape[0], input_shape[-1]))

    def call(self, x):
        scores, values = self.cell.project(x)  # (B, T, H), (B, T, H, D)
        return self.cell.output_projection(self.prefix(scores, values))


class CausalSelfAttention(keras.layers.Layer):
    def __init__(self, num_heads, key_dim, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(num_heads, key_dim)

    def build(self, input_shape):
        self.attention.build(input_shape, input_shape)

    def call(self, x):
        return self.attention(x, x, use_causal_mask=True)


def contenders(heads, key_dim, width):
    return {
        "aaren": lambda: Aaren(heads, key_dim, return_sequences=True),
        "aaren_associative": lambda: Aaren(
            heads, key_dim, return_sequences=True, method="associative"
        ),
        "tfp_style": lambda: ProjectedPrefix(heads, key_dim, tfp_style_prefix),
        "mha_causal": lambda: CausalSelfAttention(heads, key_dim),
        "rnn_cell": lambda: keras.layers.RNN(AarenCell(heads, key_dim), return_sequences=True),
        "lstm": lambda: keras.layers.LSTM(width, return_sequences=True),
        "cumsum_prefix": lambda: ProjectedPrefix(heads, key_dim, cumsum_prefix),
        "projections_only": lambda: ProjectedPrefix(heads, key_dim, no_prefix),
    }


CONTENDERS = tuple(contenders(1, 1, 1))
# References, run only when `--only` names them: not layers a user would pick, but Aaren's own
# projections around the cheapest prefixes, to show where Aaren's time goes.
REFERENCES = ("cumsum_prefix", "projections_only")


# The environment variables that choose how host memory is allocated. They move Aaren's figures
# on TensorFlow's CPU backend by up to 1.6x (docs/benchmarks.md), so every record names them.
ALLOCATOR_VARIABLES = (
    "TF_CPU_ALLOCATOR_USE_BFC",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "LD_PRELOAD",
)


def device():
    """The device the backend computes on by default, such as `gpu: NVIDIA H100 80GB HBM3`."""
    if keras.backend.backend() == "jax":
        import jax

        first = jax.devices()[0]
        if first.platform != "cpu":
            return f"{first.platform}: {first.device_kind}"
        return f"cpu: {cpu_name()}"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"gpu: {gpus[0].name}" if gpus else f"cpu: {cpu_name()}"


def cpu_name():
    """The CPU's model name from `/proc/cpuinfo` (Linux), else what `platform` knows of it:
    `platform.processor()` is empty on many Linux hosts."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """What the figures were measured on, for the JSON record."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "device": device(),
        "allocator": {name: os.environ.get(name) for name in ALLOCATOR_VARIABLES},
    }


def timed(fn):
    """Milliseconds and minor page faults of one call of `fn` (pages the kernel mapped in anew)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    ms = 1000 * (time.perf_counter() - start)
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def check_correctness():
    """Aaren against stepping its cell and against the naive oracle; False if they differ.

    In full float32 precision: on a recent NVIDIA GPU, JAX multiplies the projections in TF32 by
    default, for every contender alike. The check tests the algorithm; the timed steps keep the
    default a user gets.
    """
    with full_precision_matmuls():
        return _check_correctness()


def _check_correctness():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 37, 16)).astype("float32")
    layer = Aaren(2, 8, return_sequences=True)
    parallel = ops.convert_to_numpy(layer(x))
    stepped = ops.convert_to_numpy(keras.layers.RNN(layer.cell, return_sequences=True)(x))
    scores, values = (ops.convert_to_numpy(t).astype("float64") for t in layer.cell.project(x))
    attended, _ = aaren_attention_naive(scores, values)
    oracle = ops.convert_to_numpy(layer.cell.output_projection(ops.cast(attended, "float32")))
    ok = np.allclose(parallel, stepped, atol=1e-4) and np.allclose(parallel, oracle, atol=1e-4)
    return ok, float(max(np.abs(parallel - stepped).max(), np.abs(parallel - oracle).max()))


def refuse_xla_off_tensorflow(parser, xla):
    """Stop with a usage error when `--xla` is asked for on a backend other than TensorFlow."""
    backend = keras.backend.backend()
    if xla and backend != "tensorflow":
        parser.error(
            "--xla compiles TensorFlow's step with XLA; on JAX every step is jax.jit-compiled. "
            f"Received: --xla with KERAS_BACKEND={backend}"
        )


def train_step_on(make_layer, batch, steps, width, xla=False):
    """A layer, its input, and the compiled step: output, sum-of-squares loss, gradients.

    Returns `run()`, which calls the step once and waits for its gradients. On JAX, `run` also
    has `memory_analysis()`: XLA's buffer plan of the compiled step.
    """
    if keras.backend.backend() == "jax":
        return _jax_train_step_on(make_layer, batch, steps, width)
    import tensorflow as tf

    layer = make_layer()
    x = tf.random.normal((batch, steps, width))
    layer(x[:, :2])

    @tf.function(jit_compile=xla)
    def train_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    def run():
        return [g.numpy() for g in train_step(x)]

    return run


def _jax_train_step_on(make_layer, batch, steps, width):
    import jax
    import jax.numpy as jnp

    layer = make_layer()
    x = jax.random.normal(jax.random.key(0), (batch, steps, width))
    layer(x[:, :2])
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(x, trainable):
        y, _ = layer.stateless_call(trainable, non_trainable, x)
        return jnp.sum(jnp.square(y))

    train_step = jax.jit(jax.grad(loss, argnums=(0, 1)))

    def run():
        # Dispatch is asynchronous: without the wait, a GPU step would time only its launch.
        return jax.block_until_ready(train_step(x, trainable))

    run.memory_analysis = lambda: train_step.lower(x, trainable).compile().memory_analysis()
    return run


def in_turns(keys, rounds):
    """`keys` in `rounds` rounds, each round starting one key further along than the last."""
    for round_index in range(rounds):
        shift = round_index % len(keys)
        yield from keys[shift:] + keys[:shift]


def time_round_robin(makers, batch, steps, width, repeats, xla):
    """Median ms of each contender's step, the contenders timed in turns.

    Every contender is built, traced and run twice first; then each of `repeats` rounds times
    one step of every contender, starting one contender further along each round. A slow spell
    of this shared machine then falls on every contender alike instead of on whichever happened
    to be timed during it, which matters for ratios: back to back, a median of 5 of Aaren's
    step at T = 4096 moved 1.4x between two runs. Returns `{name: median}`, every sample, and
    each contender's median count of minor page faults per step.
    """
    runs = {name: train_step_on(make, batch, steps, width, xla) for name, make in makers.items()}
    for run in runs.values():
        for _ in range(2):
            run()
    names = list(runs)
    samples = {name: [] for name in names}
    faults = {name: [] for name in names}
    for name in in_turns(names, repeats):
        ms, count = timed(runs[name])
        samples[name].append(ms)
        faults[name].append(count)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return medians, samples, {name: statistics.median(f) for name, f in faults.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--xla", action="store_true", help="tf.function(jit_compile=True)")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, help="run only these contenders")
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
    max_length = MAX_LENGTH | parse_max_length(parser, args.max_length)
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        sys.exit(f"benchmarks.layers measures {' or '.join(BACKENDS)}. Received: {backend}")
    refuse_xla_off_tensorflow(parser, args.xla)

    ok, error = check_correctness()
    if not ok:
        print(f"Aaren does not match its oracle (max error {error:.2e}): not reporting.")
        return 1
    width = args.heads * args.key_dim
    chosen = contenders(args.heads, args.key_dim, width)
    names = args.only or [name for name in CONTENDERS if name not in REFERENCES]
    chosen = {name: chosen[name] for name in names}
    results = {name: {} for name in chosen}
    samples = {name: {} for name in chosen}
    faults = {name: {} for name in chosen}
    for steps in args.lengths:
        makers = {n: make for n, make in chosen.items() if steps <= max_length.get(n, steps)}
        medians, times, counts = time_round_robin(
            makers, args.batch, steps, width, args.repeats, args.xla
        )
        for name, ms in medians.items():
            results[name][steps] = ms
            samples[name][steps] = times[name]
            faults[name][steps] = counts[name]
            print(
                f"T={steps:6d} {name:18s} {ms:10.2f} ms  {counts[name]:9.0f} page faults",
                flush=True,
            )

    print(
        f"\nforward+backward, median of {args.repeats} (ms), {compile_mode(args)} on {device()}; "
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

    os.makedirs(args.output_dir, exist_ok=True)
    record = {
        "protocol": vars(args)
        | {
            "width": width,
            "oracle_max_error": error,
            "compile": compile_mode(args),
            "max_length": max_length,
        },
        "machine": machine(),
        "median_ms": results,
        "samples_ms": samples,
        "page_faults_per_step": faults,
    }
    with open(os.path.join(args.output_dir, "layers.json"), "w") as f:
        json.dump(record, f, indent=2)
    plot(results, os.path.join(args.output_dir, "layers.png"), args)
    print(f"wrote {args.output_dir}/layers.json and layers.png")
    return 0


def parse_max_length(parser, items):
    """`["mha_causal=8192", ...]` as `{"mha_causal": 8192}`, or a parser error naming the item."""
    limits = {}
    for item in items:
        name, _, steps = item.partition("=")
        if name not in CONTENDERS or not steps.isdigit() or int(steps) < 1:
            parser.error(
                "--max-length takes NAME=T, NAME one of "
                f"{', '.join(CONTENDERS)} and T a positive integer. Received: {item!r}"
            )
        limits[name] = int(steps)
    return limits


def compile_mode(args):
    """How the timed step was compiled, for titles and tables."""
    if keras.backend.backend() == "jax":
        return "jax.jit"
    return "XLA" if args.xla else "tf.function"


def plot(results, path, args):
    plot_against_length(
        results,
        path,
        "forward+backward, ms (median)",
        f"One layer, batch {args.batch}, {args.heads} heads of {args.key_dim} "
        f"({compile_mode(args)}, {device()})",
    )


def colour(name):
    """The contender's colour, the same in every plot whichever contenders it shows."""
    return f"C{CONTENDERS.index(name) % 10}"


def plot_against_length(results, path, ylabel, title, lower_bounds=None, ranges=None):
    """`{contender: {T: value}}` as one log-log line per contender, saved to `path`.

    `lower_bounds`, of the same structure, are values known only to be exceeded: drawn as
    upward triangles in the contender's colour, unconnected. `ranges`, `{contender: {T: (low,
    high)}}`, are drawn as vertical bars in the contender's colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lower_bounds = lower_bounds or {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in results:
        row, bounds = results[name], lower_bounds.get(name, {})
        if not row and not bounds:
            continue
        lengths = sorted(row)
        (line,) = ax.plot(
            lengths, [row[t] for t in lengths], marker="o", label=name, color=colour(name)
        )
        spans = (ranges or {}).get(name, {})
        if spans:
            points = sorted(spans)
            low, high = ([spans[t][i] for t in points] for i in (0, 1))
            ax.vlines(points, low, high, color=line.get_color(), linewidth=4, alpha=0.4)
        if bounds:
            label = f"{name}: more than (stopped)"
            points = sorted(bounds)
            y = [bounds[t] for t in points]
            ax.plot(points, y, "^", color=line.get_color(), linestyle="none", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
