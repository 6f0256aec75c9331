"""What the benchmark modules share: the contenders, their training step, the oracle check that
refuses to report, timing in turns, process memory, the machine record, the JSON and the plots.

Shape letters: B batch, T timesteps, H heads, D value dimension.
"""

import dataclasses
import json
import os
import platform
import resource
import time
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from keras_aaren import Aaren, AarenBlock, AarenCell
from keras_aaren.ops import aaren_attention_naive, full_precision_matmuls

BACKENDS = ("tensorflow", "jax")

# The largest difference from the oracle a benchmark accepts before it refuses to report: float32
# against the float64 oracle, well above rounding and far below any error in the algorithm.
ORACLE_TOLERANCE = 1e-4

# The environment variables that choose how host memory is allocated. They move Aaren's figures
# on TensorFlow's CPU backend (docs/benchmarks.md), so every record names them.
ALLOCATOR_VARIABLES = (
    "TF_CPU_ALLOCATOR_USE_BFC",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "LD_PRELOAD",
)


# ---------------------------------------------------------------------------------------------
# Contenders


def tfp_style_prefix(scores, values):
    """The softmax prefix as a TFP-style implementation computes it: one associative scan over
    the concatenated `[m, u, w]` tensor, with no chunking.

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
        self.prefix = prefix
        self.cell = AarenCell(num_heads, key_dim)

    def build(self, input_shape):
        self.cell.build((input_shape[0], input_shape[-1]))

    def call(self, x):
        scores, values = self.cell.project(x)  # (B, T, H), (B, T, H, D)
        return self.cell.output_projection(self.prefix(scores, values))


class CausalSelfAttention(keras.layers.Layer):
    """`keras.layers.MultiHeadAttention` over a sequence and itself, with a causal mask."""

    def __init__(self, num_heads, key_dim, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(num_heads, key_dim)

    def build(self, input_shape):
        self.attention.build(input_shape, input_shape)

    def call(self, x):
        return self.attention(x, x, use_causal_mask=True)


@dataclasses.dataclass(frozen=True)
class Contender:
    """A layer to benchmark.

    Attributes:
        build: `(num_heads, key_dim)` -> a layer mapping `(B, T, num_heads * key_dim)` to a
            sequence of the same length.
        exact: whether the layer computes Aaren's attention through an `AarenCell` at its
            `cell` attribute: the oracle check then compares its output with
            `aaren_attention_naive` over that cell's projections.
        reference: whether it runs only when named (`--only`): a yardstick, not a layer a user
            would pick.
    """

    build: Callable[[int, int], keras.layers.Layer]
    exact: bool = False
    reference: bool = False


CONTENDERS = {
    "aaren": Contender(lambda h, k: Aaren(h, k, return_sequences=True), exact=True),
    "aaren_associative": Contender(
        lambda h, k: Aaren(h, k, return_sequences=True, method="associative"), exact=True
    ),
    "tfp_style": Contender(lambda h, k: ProjectedPrefix(h, k, tfp_style_prefix), exact=True),
    "mha_causal": Contender(CausalSelfAttention),
    "rnn_cell": Contender(
        lambda h, k: keras.layers.RNN(AarenCell(h, k), return_sequences=True), exact=True
    ),
    "lstm": Contender(lambda h, k: keras.layers.LSTM(h * k, return_sequences=True)),
    # Aaren's own projections around the cheapest prefixes, to show where Aaren's time goes.
    "cumsum_prefix": Contender(
        lambda h, k: ProjectedPrefix(h, k, cumsum_prefix), exact=True, reference=True
    ),
    "projections_only": Contender(lambda h, k: ProjectedPrefix(h, k, no_prefix), reference=True),
}

# One colour per contender, the same in every plot whichever contenders it shows.
COLOURS = {name: f"C{i % 10}" for i, name in enumerate(CONTENDERS)}


def oracle_error(contenders, seed=0):
    """The largest difference between any exact contender's output and the naive oracle's.

    Each contender is built with 2 heads of 8 and called on a `(2, 37, 16)` input; the oracle is
    `aaren_attention_naive` in float64 over the scores and values of the contender's own cell,
    projected back by that cell. Matrix products run in full float32 precision (JAX uses TF32 on
    recent NVIDIA GPUs by default, for every contender alike): the check tests the algorithm,
    while the timed steps keep the default a user gets.

    Args:
        contenders: `{name: Contender}`; those not `exact` are skipped.
        seed: seed of the input.

    Returns:
        `{name: max absolute error}` for every exact contender.
    """
    x = np.random.default_rng(seed).normal(size=(2, 37, 16)).astype("float32")
    errors = {}
    with full_precision_matmuls():
        for name, contender in contenders.items():
            if not contender.exact:
                continue
            layer = contender.build(2, 8)
            got = ops.convert_to_numpy(layer(x))
            cell = layer.cell
            scores, values = (ops.convert_to_numpy(t).astype("float64") for t in cell.project(x))
            attended, _ = aaren_attention_naive(scores, values)
            expected = ops.convert_to_numpy(cell.output_projection(ops.cast(attended, "float32")))
            errors[name] = float(np.abs(got - expected).max())
    return errors


def refuse_if_wrong(errors, what="the oracle"):
    """Print why a benchmark refuses to report and return True if any error exceeds
    `ORACLE_TOLERANCE`; return False otherwise.

    Args:
        errors: `{name: max absolute error}` against `what`.
        what: what the errors were measured against, for the message.
    """
    wrong = {name: error for name, error in errors.items() if not error <= ORACLE_TOLERANCE}
    for name, error in wrong.items():
        print(f"{name} does not match {what} (max error {error:.2e}): not reporting.")
    return bool(wrong)


# ---------------------------------------------------------------------------------------------
# The compiled training step


def compile_mode(xla):
    """How the timed step is compiled, for titles, tables and records."""
    if keras.backend.backend() == "jax":
        return "jax.jit"
    return "XLA" if xla else "tf.function"


def require_backend(parser, module, backends=BACKENDS):
    """Stop with a usage error unless Keras runs on one of `backends`."""
    backend = keras.backend.backend()
    if backend not in backends:
        parser.error(
            f"benchmarks.{module} measures {' or '.join(backends)}. "
            f"Received: KERAS_BACKEND={backend}"
        )


def refuse_xla_off_tensorflow(parser, xla):
    """Stop with a usage error when `--xla` is asked for on a backend other than TensorFlow."""
    backend = keras.backend.backend()
    if xla and backend != "tensorflow":
        parser.error(
            "--xla compiles TensorFlow's step with XLA; on JAX every step is jax.jit-compiled. "
            f"Received: --xla with KERAS_BACKEND={backend}"
        )


def train_step_on(layer, batch, steps, width, xla=False):
    """The compiled step of `layer` on a random `(batch, steps, width)` input: output,
    sum-of-squares loss, gradients with respect to the input and the weights.

    Returns `run()`, which calls the step once and waits for its gradients. On JAX, `run` also
    has `memory_analysis()`: XLA's buffer plan of the compiled step.
    """
    if keras.backend.backend() == "jax":
        return _jax_train_step_on(layer, batch, steps, width)
    import tensorflow as tf

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


def _jax_train_step_on(layer, batch, steps, width):
    import jax
    import jax.numpy as jnp

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


# ---------------------------------------------------------------------------------------------
# Timing and memory


def timed(fn):
    """Milliseconds and minor page faults of one call of `fn` (pages the kernel mapped in anew)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    ms = 1000 * (time.perf_counter() - start)
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def in_turns(keys, rounds):
    """`keys` in `rounds` rounds, each round starting one key further along than the last.

    Timing contenders in turns spreads a slow spell of a shared machine over all of them,
    instead of over whichever happened to be timed during it.
    """
    keys = list(keys)
    if not keys:
        return
    for round_index in range(rounds):
        shift = round_index % len(keys)
        yield from keys[shift:] + keys[:shift]


def status_bytes(field, pid="self"):
    """A memory field of /proc/<pid>/status (Linux), such as VmRSS or VmHWM, in bytes.

    None once the process has exited: its file is gone, or, before it is reaped, lists no memory.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return 1024 * int(line.split()[1])
    except FileNotFoundError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# The record


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


def write_json(record, output_dir, name, **dump_options):
    """Write `record` to `<output_dir>/<name>`, making the folder if needed; return the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
        json.dump(record, f, **dump_options)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_against_length(results, path, ylabel, title, lower_bounds=None, ranges=None):
    """`{contender: {T: value}}` as one log-log line per contender, saved to `path`.

    Values of 0 or less have no place on a log scale and are left out (a step's memory can
    read 0 when its buffers are smaller than the allocator's granularity). `lower_bounds`, of
    the same structure, are values known only to be exceeded: drawn as upward triangles in the
    contender's colour, unconnected. `ranges`, `{contender: {T: (low, high)}}`, are drawn as
    vertical bars in the contender's colour.
    """
    plt = pyplot()
    lower_bounds = lower_bounds or {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in results:
        row = {t: value for t, value in results[name].items() if value > 0}
        bounds = lower_bounds.get(name, {})
        if not row and not bounds:
            continue
        lengths = sorted(row)
        (line,) = ax.plot(
            lengths, [row[t] for t in lengths], marker="o", label=name, color=COLOURS.get(name)
        )
        spans = {t: span for t, span in (ranges or {}).get(name, {}).items() if span[0] > 0}
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sequence_model(kind, width, heads, depth):
    """`depth` layers of `kind` (`"aaren"`: `AarenBlock`s; `"lstm"`) over `(B, T, width)`."""
    layers = [keras.Input((None, width))]
    for _ in range(depth):
        if kind == "aaren":
            layers.append(AarenBlock(heads, width // heads))
        else:
            layers.append(keras.layers.LSTM(width, return_sequences=True))
    return keras.Sequential(layers)
