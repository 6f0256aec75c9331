"""What the benchmark modules share: the contenders, their training step, the oracle check that
refuses to report, timing in turns, process memory, the machine record, the JSON and the plots,
and the models served one token per call (Aaren blocks, an LSTM stack, a KV-cache Transformer)
with the loops that serve and time them.

Shape letters: B batch, T timesteps, H heads, D value dimension.
"""

import dataclasses
import json
import math
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
        lambda h, k: keras.layers.RNN(AarenCell(h, k, output_dim=h * k), return_sequences=True),
        exact=True,
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


def refuse_if_wrong(errors, what="the oracle", tolerance=ORACLE_TOLERANCE):
    """Print why a benchmark refuses to report and return True if any error exceeds
    `tolerance`; return False otherwise.

    Args:
        errors: `{name: max absolute error}` against `what`.
        what: what the errors were measured against, for the message.
        tolerance: the largest error accepted.
    """
    wrong = {name: error for name, error in errors.items() if not error <= tolerance}
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


# ---------------------------------------------------------------------------------------------
# Serving one token per call


def transformer_model(width, heads, depth):
    """`depth` post-norm blocks of causal self-attention and a ReLU feed-forward network of
    `4 * width`, the AarenBlock's layout, over `(B, T, width)`: the KV-cache Transformer's
    whole-sequence form, which its step (`transformer_step_model`) must reproduce."""
    inputs = keras.Input((None, width))
    x = inputs
    for i in range(depth):
        attention = keras.layers.MultiHeadAttention(heads, width // heads, name=f"attention_{i}")
        x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"attention_norm_{i}")(
            x + attention(x, x, use_causal_mask=True)
        )
        hidden = keras.layers.Dense(4 * width, activation="relu", name=f"ffn_in_{i}")(x)
        x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"ffn_norm_{i}")(
            x + keras.layers.Dense(width, name=f"ffn_out_{i}")(hidden)
        )
    return keras.Model(inputs, x)


class CachedAttention(keras.layers.Layer):
    """One token's attention over the cached keys and values and its own, with the weights of
    a trained `MultiHeadAttention`: `(x, keys, values) -> (attended, key, value)`, `x` of shape
    `(B, width)`, the caches `(B, L, heads, dim)`, the token's key and value `(B, 1, heads, dim)`.
    """

    def __init__(self, attention, **kwargs):
        super().__init__(**kwargs)
        self.attention = attention

    def call(self, x, keys, values):
        # The attention's variables by their last two path parts: "query/kernel", ...
        weights = {"/".join(v.path.split("/")[-2:]): v for v in self.attention.weights}

        def project(name, t):  # (B, width) -> (B, heads, dim)
            kernel, bias = weights[f"{name}/kernel"], weights[f"{name}/bias"]
            return ops.einsum("bw,whd->bhd", t, kernel) + bias

        query, key, value = (project(n, x) for n in ("query", "key", "value"))
        query = query / float(np.sqrt(query.shape[-1]))
        # The token's own score is joined to the cached ones, not its key to the cache: the
        # scores are `dim` times smaller than the keys, so no step copies the cache.
        own = ops.sum(query * key, axis=-1, keepdims=True)  # (B, heads, 1)
        scores = ops.concatenate([ops.einsum("bhd,blhd->bhl", query, keys), own], axis=-1)
        scores = ops.softmax(scores, axis=-1)  # (B, heads, L + 1)
        attended = ops.einsum("bhl,blhd->bhd", scores[..., :-1], values)
        attended = attended + scores[..., -1:] * value
        output = ops.einsum("bhd,hdw->bw", attended, weights["attention_output/kernel"])
        return output + weights["attention_output/bias"], key[:, None], value[:, None]


def transformer_step_model(model, cache_length, batch_size=1):
    """The KV-cache step of `transformer_model`, the caches of `cache_length` entries (`None`:
    any), with named inputs `x, keys_i, values_i` and outputs `y, new_keys_i, new_values_i`:
    the token's own keys and values, which the caller appends to the caches."""
    width = model.inputs[0].shape[-1]
    attentions = [
        layer for layer in model.layers if isinstance(layer, keras.layers.MultiHeadAttention)
    ]
    heads, dim = attentions[0].num_heads, attentions[0].key_dim
    x = keras.Input(batch_shape=(batch_size, width), name="x")
    inputs, outputs, h = [x], {}, x
    for i, attention in enumerate(attentions):
        cache = [
            keras.Input(batch_shape=(batch_size, cache_length, heads, dim), name=f"{n}_{i}")
            for n in ("keys", "values")
        ]
        inputs += cache
        attended, outputs[f"new_keys_{i}"], outputs[f"new_values_{i}"] = CachedAttention(attention)(
            h, *cache
        )
        h = model.get_layer(f"attention_norm_{i}")(h + attended)
        hidden = model.get_layer(f"ffn_in_{i}")(h)
        h = model.get_layer(f"ffn_norm_{i}")(h + model.get_layer(f"ffn_out_{i}")(hidden))
    return keras.Model(inputs, {"y": h, **outputs}, name="kv_step")


def kv_cache_step_function(model):
    """`step(x, caches) -> (y, caches)` serving `transformer_model` one token per call, batch 1,
    each call returning the caches grown by the token's keys and values.

    The caches are `{"keys_i": (1, L, heads, dim), "values_i": ...}`, named as the inputs of
    `transformer_step_model`; `step.initial_states()` gives empty ones. On TensorFlow the step
    is a `tf.function` traced once for any cache length (without XLA: a program compiled per
    shape would compile again at every token); elsewhere it calls the step model directly.
    """
    step_model = transformer_step_model(model, None)
    token, *caches = step_model.inputs
    names = [t.name for t in caches]

    def run(x, *caches):
        out = step_model({"x": x, **dict(zip(names, caches))})
        grown = [ops.concatenate([c, out[f"new_{n}"]], axis=1) for n, c in zip(names, caches)]
        return out["y"], grown

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        signature = [tf.TensorSpec(t.shape, t.dtype) for t in (token, *caches)]
        run = tf.function(run, input_signature=signature).get_concrete_function()

    def step(x, caches):
        y, grown = run(ops.convert_to_tensor(x), *(caches[n] for n in names))
        return y, dict(zip(names, grown))

    step.initial_states = lambda: {
        n: ops.zeros((1, 0, *t.shape[2:])) for n, t in zip(names, caches)
    }
    return step


def sequence_model(kind, width, heads, depth):
    """`depth` layers of `kind` over `(B, T, width)`: `"aaren"`, `AarenBlock`s; `"lstm"`,
    `keras.layers.LSTM`s; `"transformer_kv"`, the blocks of `transformer_model`."""
    if kind == "transformer_kv":
        return transformer_model(width, heads, depth)
    if kind not in ("aaren", "lstm"):
        raise ValueError(
            f"kind must be 'aaren', 'lstm' or 'transformer_kv'. Received: kind={kind!r}"
        )
    layers = [keras.Input((None, width))]
    for _ in range(depth):
        if kind == "aaren":
            layers.append(AarenBlock(heads, width // heads))
        else:
            layers.append(keras.layers.LSTM(width, return_sequences=True))
    return keras.Sequential(layers)


def to_host(y):
    """`y` as a NumPy array, fetched from the device (and waited for) unless it is one already."""
    return y if isinstance(y, np.ndarray) else ops.convert_to_numpy(y)


def state_bytes(states):
    """The bytes of a stream's state: every tensor of `states` (a list or a dict)."""
    return sum(
        math.prod(s.shape) * np.dtype(keras.backend.standardize_dtype(s.dtype)).itemsize
        for s in keras.tree.flatten(states)
    )


@dataclasses.dataclass
class Stream:
    """What serving a stream one token per call recorded (`serve`).

    Attributes:
        outputs: `(T, B, width)`, the output of every token.
        latencies: `(T,)` seconds of every call, its output fetched.
        kept: `{t: states}`, the states before the tokens at the positions asked for.
        states: the states after the last token.
        resident: `(T,)` the process's resident bytes after each token, or None.
        state_bytes: `(T,)` the state's bytes after each token, or None.
    """

    outputs: np.ndarray
    latencies: np.ndarray
    kept: dict
    states: object
    resident: np.ndarray | None = None
    state_bytes: np.ndarray | None = None


def serve(step, states, xs, keep_at=(), record_memory=False):
    """Serve the tokens `xs`, `(T, B, width)`, one per call from `states`, each call's output
    fetched before the next token is sent.

    Args:
        step: `(x, states) -> (y, states)`, `x` of shape `(B, width)`: a step of
            `keras_aaren.streaming.make_step_function`, `kv_cache_step_function` or an
            exported runtime's.
        states: the states the stream starts from.
        xs: the tokens.
        keep_at: the positions (0-based) before which the states are kept.
        record_memory: whether to read the resident memory and the state's size after every
            token (outside the timed call).

    Returns:
        A `Stream`.
    """
    count = len(xs)
    latencies, kept, outputs = np.empty(count), {}, None
    resident = np.empty(count) if record_memory else None
    sizes = np.empty(count, "int64") if record_memory else None
    for t, x in enumerate(xs):
        if t in keep_at:
            kept[t] = states
        start = time.perf_counter()
        y, states = step(x, states)
        y = to_host(y)
        latencies[t] = time.perf_counter() - start
        if outputs is None:
            outputs = np.empty((count, *y.shape), y.dtype)
        # A copy: a runtime may hand back its own output buffer, rewritten at the next call.
        outputs[t] = y
        if record_memory:
            resident[t] = status_bytes("VmRSS")
            sizes[t] = state_bytes(states)
    return Stream(outputs, latencies, kept, states, resident, sizes)


def step_latencies(served, width, rounds, calls, seed=1):
    """Seconds of every call of each served step, timed in turns: `{key: [seconds]}`.

    Each of `rounds` rounds gives every key `calls` calls in a row, starting one key further
    along than the last round (`in_turns`), and every call steps from the same kept states, so
    that timing leaves each stream where it was and a late position is timed as late as it was
    served.

    Args:
        served: `{key: (step, states)}`, `step` as for `serve`; the batch of a key's tokens is
            its states' first dimension.
        width: the tokens' width.
        rounds: rounds of the timing.
        calls: calls per key and round.
        seed: seed of the random tokens.
    """
    batch = {key: keras.tree.flatten(states)[0].shape[0] for key, (_, states) in served.items()}
    xs = np.random.default_rng(seed).normal(size=(calls, max(batch.values(), default=1), width))
    xs = xs.astype("float32")
    samples = {key: [] for key in served}
    for key in in_turns(served, rounds):
        step, states = served[key]
        for x in xs[:, : batch[key]]:
            start = time.perf_counter()
            to_host(step(x, states)[0])
            samples[key].append(time.perf_counter() - start)
    return samples
