"""What the benchmark modules share: the contenders, their training step and oracle check, the
arguments, the timing loop, the record, and the models served one token per call with the loop
that serves them. Shape letters: B batch, T timesteps, H heads, D value dimension.
"""

import argparse
import json
import math
import os
import platform
import textwrap
import time
import types
import typing
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from keras_aaren import Aaren, AarenBlock, AarenCell
from keras_aaren.ops import aaren_attention_naive, full_precision_matmuls

# The largest difference from the oracle a benchmark accepts before it refuses to report: float32
# against the float64 oracle, well above rounding and far below any error in the algorithm.
ORACLE_TOLERANCE = 1e-4

# The environment variables that choose how host memory is allocated. They move Aaren's figures
# on TensorFlow's CPU backend (docs/benchmarks.md), so every record names them.
ALLOCATOR_VARIABLES = ("TF_CPU_ALLOCATOR_USE_BFC", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")

# ---------------------------------------------------------------------------------------------
# Contenders


def tfp_style_prefix(scores, values):
    """The softmax prefix as a TFP-style implementation computes it: one associative scan over
    the concatenated `[m, u, w]` tensor, no chunking. `(B, T, H)`, `(B, T, H, D)` -> `(B, T, H, D)`.
    """
    leaves = ops.concatenate([scores[..., None], ops.ones_like(scores)[..., None], values], -1)

    def combine(a, b):
        m = ops.maximum(a[..., :1], b[..., :1])
        scale_a, scale_b = ops.exp(a[..., :1] - m), ops.exp(b[..., :1] - m)
        return ops.concatenate([m, a[..., 1:] * scale_a + b[..., 1:] * scale_b], -1)

    # keras.ops.associative_scan on TensorFlow loses the rank; give the leaves' shape back.
    prefix = ops.reshape(ops.associative_scan(combine, leaves, axis=1), ops.shape(leaves))
    return prefix[..., 2:] / prefix[..., 1:2]


def no_prefix(scores, values):
    """No prefix at all: each token's value times its own score. Every scan reads the scores and
    the values and writes one output per value, so this is what the layer costs around its scan.
    """
    return values * scores[..., None]


class ProjectedPrefix(keras.layers.Layer):
    """Aaren's projections (an `AarenCell`'s weights) around another prefix over the tokens:
    `prefix` maps scores `(B, T, H)` and values `(B, T, H, D)` to attended values `(B, T, H, D)`,
    as `aaren_scan` does in `Aaren`."""

    def __init__(self, num_heads, key_dim, prefix, **kwargs):
        super().__init__(**kwargs)
        self.prefix = prefix
        self.cell = AarenCell(num_heads, key_dim)

    def build(self, input_shape):
        self.cell.build((input_shape[0], input_shape[-1]))

    def call(self, x):
        return self.cell.output_projection(self.prefix(*self.cell.project(x)))


def causal_self_attention(num_heads, key_dim):
    """`keras.layers.MultiHeadAttention` over a sequence and itself, with a causal mask."""
    x = keras.Input((None, num_heads * key_dim))
    attention = keras.layers.MultiHeadAttention(num_heads, key_dim)
    return keras.Model(x, attention(x, x, use_causal_mask=True))


class Contender(typing.NamedTuple):
    """A layer to benchmark: `build(num_heads, key_dim)` maps `(B, T, num_heads * key_dim)` to a
    sequence of the same length; `exact`, it computes Aaren's attention through an `AarenCell` at
    its `cell` attribute, which the oracle check compares with `aaren_attention_naive`;
    `reference`, it runs only when `--only` names it: a yardstick, not a layer to pick."""

    build: Callable[[int, int], keras.layers.Layer]
    exact: bool = False
    reference: bool = False


CONTENDERS = {
    "aaren": Contender(lambda h, k: Aaren(h, k, return_sequences=True), exact=True),
    "aaren_associative": Contender(
        lambda h, k: Aaren(h, k, return_sequences=True, method="associative"), exact=True
    ),
    "tfp_style": Contender(lambda h, k: ProjectedPrefix(h, k, tfp_style_prefix), exact=True),
    "mha_causal": Contender(causal_self_attention),
    "rnn_cell": Contender(
        lambda h, k: keras.layers.RNN(AarenCell(h, k, output_dim=h * k), return_sequences=True),
        exact=True,
    ),
    "lstm": Contender(lambda h, k: keras.layers.LSTM(h * k, return_sequences=True)),
    "projections_only": Contender(lambda h, k: ProjectedPrefix(h, k, no_prefix), reference=True),
}


def oracle_error(contenders, seed=0):
    """`{name: largest difference}` of every exact contender (2 heads of 8, on a `(2, 37, 16)`
    input) from `aaren_attention_naive` in float64 over its own cell's scores and values. Matrix
    products run in full float32 (JAX uses TF32 on recent NVIDIA GPUs by default): the check
    tests the algorithm; the timed steps keep the default a user gets."""
    x = np.random.default_rng(seed).normal(size=(2, 37, 16)).astype("float32")
    errors = {}
    with full_precision_matmuls():
        for name, contender in contenders.items():
            if contender.exact:
                layer = contender.build(2, 8)
                got = ops.convert_to_numpy(layer(x))
                scores, values = (to_host(t).astype("float64") for t in layer.cell.project(x))
                attended, _ = aaren_attention_naive(scores, values)
                expected = layer.cell.output_projection(ops.cast(attended, "float32"))
                errors[name] = float(np.abs(got - to_host(expected)).max())
    return errors


def refuse_if_wrong(errors, what="the oracle", tolerance=ORACLE_TOLERANCE):
    """Print why a benchmark refuses to report and return True if any of `{name: error}` exceeds
    `tolerance`; return False otherwise."""
    wrong = {name: error for name, error in errors.items() if not error <= tolerance}
    for name, error in wrong.items():
        print(f"{name} does not match {what} (max error {error:.2e}): not reporting.")
    return bool(wrong)


# ---------------------------------------------------------------------------------------------
# Arguments and the compiled training step


def parser(doc, backends=("tensorflow", "jax"), jit_compile=None):
    """An argument parser described by the module's docstring, with `--output-dir` and, if
    `jit_compile` names what it compiles, `--jit-compile`; a usage error unless Keras runs on one
    of `backends`."""
    result = argparse.ArgumentParser(description=doc.splitlines()[0])
    result.add_argument("--output-dir", default="outputs/benchmarks")
    if jit_compile:
        help = f"compile {jit_compile} as jit_compile=True does (XLA; PyTorch: torch.compile)"
        result.add_argument("--jit-compile", action="store_true", help=help)
    if keras.backend.backend() not in backends:
        received = keras.backend.backend()
        result.error(f"this benchmark measures {' or '.join(backends)}. Received: {received}")
    return result


def parse(parser, argv, *positive):
    """`parser`'s arguments; a usage error if one of the `positive` ones is given below 1, or
    for `--jit-compile` on JAX, where every step is `jax.jit`-compiled."""
    args = parser.parse_args(argv)
    for name in positive:
        value = getattr(args, name)
        if value is not None and (min(value) if isinstance(value, list) else value) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1. Received: {value}")
    if getattr(args, "jit_compile", False) and keras.backend.backend() == "jax":
        parser.error("--jit-compile: on JAX every step is jax.jit-compiled. Received: jax")
    return args


def compile_mode(jit_compile):
    """How the timed step is compiled, for titles, tables and records."""
    return {
        "jax": ("jax.jit", "jax.jit"),
        "tensorflow": ("tf.function", "tf.function(jit_compile=True)"),
        "torch": ("eager", "torch.compile"),
    }[keras.backend.backend()][bool(jit_compile)]


def train_step(layer, batch, steps, width, jit_compile=False):
    """`run()`: one step of `layer` on a random `(batch, steps, width)` input (output,
    sum-of-squares loss, gradients of the input and the weights), waited for: a `tf.function`
    (XLA if `jit_compile`); `jax.jit` of `jax.grad` over `stateless_call`, with
    `run.memory_analysis()`, XLA's buffer plan; eager `torch.autograd.grad` (`torch.compile` if
    `jit_compile`, as Keras' `fit` does on PyTorch)."""
    x = keras.random.normal((batch, steps, width), seed=0)
    layer(x[:, :2])
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        fixed = [v.value for v in layer.non_trainable_variables]

        def loss(x, trainable):
            return ops.sum(ops.square(layer.stateless_call(trainable, fixed, x)[0]))

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))

        def run():
            # Dispatch is asynchronous: without the wait, a GPU step would time only its launch.
            return jax.block_until_ready(step(x, trainable))

        run.memory_analysis = lambda: step.lower(x, trainable).compile().memory_analysis()
        return run
    if backend == "torch":
        import torch

        x.requires_grad_(True)
        weights = [v.value for v in layer.trainable_variables]

        def step():
            return torch.autograd.grad(torch.sum(torch.square(layer(x))), [x, *weights])

        step = torch.compile(step) if jit_compile else step

        def run():
            gradients = step()
            if x.is_cuda:
                torch.cuda.synchronize()
            return gradients

        return run
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def tf_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    return lambda: [g.numpy() for g in tf_step(x)]


# ---------------------------------------------------------------------------------------------
# Timing and memory


def time_in_turns(calls, rounds, per_turn=1, warmup=0):
    """`{key: [seconds of every timed call]}` of `calls`, `{key: fn}`, after `warmup` untimed
    calls each: each of `rounds` rounds gives every key `per_turn` calls in a row, starting one
    key further along than the last round, so that a slow spell of a shared machine falls on
    every key instead of on whichever was timed during it."""
    keys = list(calls)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {key: [] for key in keys}
    for index in range(rounds * bool(keys)):
        shift = index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            for _ in range(per_turn):
                start = time.perf_counter()
                calls[key]()
                samples[key].append(time.perf_counter() - start)
    return samples


def status_bytes(field, pid="self"):
    """A memory field of /proc/<pid>/status (Linux), such as VmRSS, in bytes; None once the
    process has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = [line for line in f if line.startswith(field + ":")]
        return 1024 * int(lines[0].split()[1]) if lines else None
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# The record


def device():
    """The device the backend computes on by default, such as `gpu: NVIDIA H100 80GB HBM3`."""
    if keras.backend.backend() == "jax":
        import jax

        if jax.devices()[0].platform != "cpu":
            return f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
    elif keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            return f"gpu: {torch.cuda.get_device_name()}"
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return f"gpu: {tf.config.list_physical_devices('GPU')[0].name}"
    with open("/proc/cpuinfo") as f:  # Linux; `platform.processor()` is empty on many hosts
        return "cpu: " + next(line for line in f if "model name" in line).split(":")[1].strip()


def machine():
    """What the figures were measured on, for the JSON record."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "device": device(),
        "allocator": {name: os.environ.get(name) for name in ALLOCATOR_VARIABLES},
    }


def write_json(record, output_dir, name):
    """Write `record` to `<output_dir>/<name>`, making the folder if needed; return the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_against_length(results, path, ylabel, title):
    """`{contender: {T: value}}` as one log-log line per contender (one colour per name in every
    plot), saved to `path`; values of 0 or less have no place on a log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {name: f"C{i}" for i, name in enumerate(CONTENDERS)}
    for name, row in results.items():
        lengths = sorted(t for t, value in row.items() if value > 0)
        if lengths:
            ax.plot(lengths, [row[t] for t in lengths], "o-", label=name, color=colours.get(name))
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="sequence length T", ylabel=ylabel)
    # A long device name would run past the figure's edges on one line.
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Serving one token per call


def sequence_model(kind, width, heads, depth):
    """`depth` layers of `kind` over `(B, T, width)`: `"aaren"`, `AarenBlock`s; `"lstm"`,
    `keras.layers.LSTM`s; `"transformer_kv"`, post-norm blocks of causal self-attention and a
    ReLU feed-forward network of `4 * width` (the AarenBlock's layout), which
    `transformer_step_model` serves with a KV cache."""
    inputs = keras.Input((None, width))
    x = inputs
    for i in range(depth):
        if kind == "aaren":
            x = AarenBlock(heads, width // heads)(x)
        elif kind == "lstm":
            x = keras.layers.LSTM(width, return_sequences=True)(x)
        elif kind == "transformer_kv":
            attention = keras.layers.MultiHeadAttention(
                heads, width // heads, name=f"attention_{i}"
            )
            x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"attention_norm_{i}")(
                x + attention(x, x, use_causal_mask=True)
            )
            hidden = keras.layers.Dense(4 * width, activation="relu", name=f"ffn_in_{i}")(x)
            x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"ffn_norm_{i}")(
                x + keras.layers.Dense(width, name=f"ffn_out_{i}")(hidden)
            )
        else:
            raise ValueError(f"kind must be 'aaren', 'lstm' or 'transformer_kv'. Received: {kind}")
    return keras.Model(inputs, x)


class CachedAttention(keras.layers.Layer):
    """One token's attention over the cached keys and values and its own, with a trained
    `MultiHeadAttention`'s weights: `(x (B, width), keys, values (B, L, heads, dim))` ->
    `(attended, key, value)`, the token's key and value `(B, 1, heads, dim)`."""

    def __init__(self, attention, **kwargs):
        super().__init__(**kwargs)
        self.attention = attention

    def call(self, x, keys, values):
        # The attention's variables by their last two path parts: "query/kernel", ...
        weights = {"/".join(v.path.split("/")[-2:]): v for v in self.attention.weights}

        def project(name):  # (B, width) -> (B, heads, dim)
            return ops.einsum("bw,whd->bhd", x, weights[f"{name}/kernel"]) + weights[f"{name}/bias"]

        query, key, value = project("query"), project("key"), project("value")
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
    """The KV-cache step of a `"transformer_kv"` model, caches of `cache_length` entries (`None`:
    any), with inputs `x, keys_i, values_i` and outputs `y, new_keys_i, new_values_i`: the
    token's own keys and values, which the caller appends to the caches."""
    width = model.inputs[0].shape[-1]
    attentions = [lay for lay in model.layers if isinstance(lay, keras.layers.MultiHeadAttention)]
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
    """`step(x, caches) -> (y, caches grown by the token's keys and values)` serving a
    `"transformer_kv"` model, batch 1; `step.initial_states()` gives empty caches. A `tf.function`
    traced once for any cache length (without XLA, which would compile again at every token)."""
    import tensorflow as tf

    step_model = transformer_step_model(model, None)
    token, *caches = step_model.inputs
    names = [t.name for t in caches]

    def grow(x, *caches):
        out = step_model({"x": x, **dict(zip(names, caches))})
        return out["y"], [ops.concatenate([c, out[f"new_{n}"]], 1) for n, c in zip(names, caches)]

    signature = [tf.TensorSpec(t.shape, t.dtype) for t in step_model.inputs]
    run = tf.function(grow, input_signature=signature).get_concrete_function()

    def step(x, caches):
        y, grown = run(ops.convert_to_tensor(x), *(caches[n] for n in names))
        return y, dict(zip(names, grown))

    step.initial_states = lambda: {
        n: ops.zeros((1, 0, *t.shape[2:])) for n, t in zip(names, caches)
    }
    return step


def to_host(y):
    """`y` as a NumPy array, fetched from the device (and waited for) unless it is one already."""
    return y if isinstance(y, np.ndarray) else ops.convert_to_numpy(y)


def state_bytes(states):
    """The bytes of a stream's state: every tensor of `states` (a list or a dict)."""
    return sum(
        math.prod(s.shape) * np.dtype(keras.backend.standardize_dtype(s.dtype)).itemsize
        for s in keras.tree.flatten(states)
    )


def serve(step, states, xs, keep_at=(), record_memory=False):
    """Serve `xs`, `(T, B, width)`, one token per timed call of `step(x, states) -> (y, states)`,
    each output fetched before the next token. Returns `outputs` `(T, B, width)`, `latencies`,
    `kept` (`{t: the states before position t}` for `t` in `keep_at`), the last `states` and,
    with `record_memory`, the process's `resident` bytes and `state_bytes` after every token."""
    run = types.SimpleNamespace(outputs=[], latencies=[], kept={}, resident=[], state_bytes=[])
    for t, x in enumerate(xs):
        if t in keep_at:
            run.kept[t] = states
        start = time.perf_counter()
        y, states = step(x, states)
        y = to_host(y)
        run.latencies.append(time.perf_counter() - start)
        # A copy: a runtime may hand back its own output buffer, rewritten at the next call.
        run.outputs.append(np.array(y))
        if record_memory:
            run.resident.append(status_bytes("VmRSS"))
            run.state_bytes.append(state_bytes(states))
    run.outputs, run.states = np.stack(run.outputs), states
    return run


def step_latencies(served, width, rounds, per_turn):
    """`{key: [seconds]}` of each served `{key: (step, states)}`, timed in turns, every call
    stepping a random token from the same kept states: a late position is timed as served."""
    rng = np.random.default_rng(1)
    calls = {}
    for key, (step, states) in served.items():
        x = rng.normal(size=(keras.tree.flatten(states)[0].shape[0], width)).astype("float32")
        calls[key] = lambda step=step, x=x, states=states: to_host(step(x, states)[0])
    return time_in_turns(calls, rounds, per_turn)
