"""Event forecasting: a neural temporal point process with Aaren blocks, against a Transformer.

Title: Neural temporal point process on a multivariate Hawkes process with AarenBlock
Description: after each event of a marked event stream, predict when the next event comes and
which type it is. No real event data ships inside a PyPI wheel, so the events come from a
3-type Hawkes process with exponential kernels, simulated with Ogata's thinning algorithm and a
fixed seed. The true process is known, so its own log-likelihood is the ceiling any model can
reach. The models (a stack of `AarenBlock`s, a causal Transformer encoder of the same width and
depth, an LSTM stack) give, at every event, a mixture of log-normals for the time to the next
event and a categorical distribution for its type (the intensity-free model of Shchur et al.,
ICLR 2020), trained by maximum likelihood.

Run:

    python examples/event_forecasting.py             # 3 seeds, 40 epochs
    python examples/event_forecasting.py --quick     # small data, one seed, one epoch

Reported per model: test log-likelihood per event (time and type; higher is better), the same
split into its time and type parts, the RMSE of the predicted mean time to the next event, and
the accuracy of the most likely next type. Outputs: `outputs/event_forecasting.{json,md,png}`.

Shape letters used in this module: B sequences, T events, M mixture components, K event types.
"""

import argparse
import os
import time

import keras
import numpy as np

from baselines import MODELS, PAD, encoder, mean_std, pad, write_outputs

# The simulated process: baseline rates mu_k, excitation alpha[k, j] of type k by an event of type
# j (the expected number of type-k children of one type-j event), exponential decay beta.
MU = np.array([0.1, 0.15, 0.05])
ALPHA = np.array([[0.3, 0.1, 0.0], [0.0, 0.2, 0.3], [0.3, 0.0, 0.2]])
BETA = 1.0
DURATION = 100.0
NUM_TYPES = len(MU)
COMPONENTS = 8
# Bounds on each component's log standard deviation of log(time): wide enough for these gaps
# (their logs have a standard deviation near 1.6), narrow enough that the predicted mean,
# exp(mu + sigma^2 / 2), cannot overflow.
LOG_SCALE_RANGE = (-5.0, 1.0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, one seed and epoch")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sequences", type=int, default=1200, help="train + test sequences")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.sequences = [0], 1, 80
    return args


def simulate_hawkes(rng):
    """One sequence of (times, types) on [0, DURATION] by Ogata's thinning algorithm."""
    times, types = [], []
    t = 0.0
    # excitation[j] = sum over past type-j events of exp(-BETA (t - t_i)): the kernel's memory.
    excitation = np.zeros(NUM_TYPES)
    while True:
        # Between events the intensity only decays, so its value now bounds it until the next one.
        bound = np.sum(MU + BETA * ALPHA @ excitation)
        wait = rng.exponential(1.0 / bound)
        t += wait
        if t > DURATION:
            return np.array(times), np.array(types)
        excitation *= np.exp(-BETA * wait)
        intensity = MU + BETA * ALPHA @ excitation
        if rng.uniform() * bound <= intensity.sum():
            kind = rng.choice(NUM_TYPES, p=intensity / intensity.sum())
            times.append(t)
            types.append(kind)
            excitation[kind] += 1.0


def true_log_likelihood(times, types):
    """The true process's log density of each event after the first, given the past: the log
    intensity of its type at its time minus the total intensity integrated since the last event.
    Returns the time and type parts, `(n - 1,)` each, which sum to that density."""
    excitation = np.zeros(NUM_TYPES)
    time_part, type_part = [], []
    for i in range(len(times)):
        if i > 0:
            gap = times[i] - times[i - 1]
            decayed = excitation * np.exp(-BETA * gap)
            intensity = MU + BETA * ALPHA @ decayed
            compensator = MU.sum() * gap + np.sum(ALPHA @ (excitation - decayed))
            # log lambda_k(t) - Lambda = [log lambda(t) - Lambda] + log(lambda_k(t) / lambda(t)).
            time_part.append(np.log(intensity.sum()) - compensator)
            type_part.append(np.log(intensity[types[i]] / intensity.sum()))
            excitation = decayed
        excitation[types[i]] += 1.0
    return np.array(time_part), np.array(type_part)


def make_data(num_sequences, seed=1234):
    """Features `(B, T, K + 1)` (one-hot type and log time since the previous event), the target
    of each event (time to and type of the next one), `(B, T, 2)`, and its weight `(B, T)`."""
    rng = np.random.default_rng(seed)
    sequences = [simulate_hawkes(rng) for _ in range(num_sequences)]
    sequences = [s for s in sequences if len(s[0]) >= 3]
    features, targets, weights = [], [], []
    for times, types in sequences:
        gaps = np.diff(times, prepend=0.0)
        features.append(np.concatenate([np.eye(NUM_TYPES)[types], np.log(gaps)[:, None]], -1))
        next_gap = np.append(gaps[1:], 1.0)
        next_type = np.append(types[1:], 0)
        targets.append(np.stack([next_gap, next_type], -1))
        # The last event of a sequence has no next event to predict.
        weights.append(np.append(np.ones(len(times) - 1), 0.0))
    x = pad(features)
    y = keras.utils.pad_sequences(targets, padding="post", dtype="float32", value=1.0)
    w = keras.utils.pad_sequences(weights, padding="post", dtype="float32", value=0.0)
    return x, y, w, sequences


def split_parameters(outputs):
    """Mixture logits, means and log scales of log(time) `(..., M)` each, type logits `(..., K)`."""
    m = COMPONENTS
    logits, means, log_scales = (outputs[..., i * m : (i + 1) * m] for i in range(3))
    return logits, means, log_scales, outputs[..., 3 * m :]


def log_likelihood(y_true, y_pred, ops=keras.ops):
    """Log density of the next event's time and of its type, `(B, T)` each. Works on tensors
    (`ops=keras.ops`) and on NumPy arrays after training (`ops=numpy_ops`)."""
    # PyTorch cannot mix its tensors with NumPy arrays in one operation.
    y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
    logits, means, log_scales, type_logits = split_parameters(y_pred)
    gap = y_true[..., 0]
    kind = ops.cast(y_true[..., 1], "int32")
    log_gap = ops.log(gap)[..., None]
    log_scales = ops.clip(log_scales, *LOG_SCALE_RANGE)
    # log-normal mixture: log sum_m w_m N(log t; mu_m, sigma_m) - log t
    log_normal = (
        -0.5 * ((log_gap - means) / ops.exp(log_scales)) ** 2 - log_scales - 0.5 * np.log(2 * np.pi)
    )
    log_weights = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
    time_part = ops.logsumexp(log_weights + log_normal, axis=-1) - log_gap[..., 0]
    log_types = type_logits - ops.logsumexp(type_logits, axis=-1, keepdims=True)
    type_part = ops.sum(log_types * ops.one_hot(kind, NUM_TYPES), axis=-1)
    return time_part, type_part


def negative_log_likelihood(y_true, y_pred):
    time_part, type_part = log_likelihood(y_true, y_pred)
    return -(time_part + type_part)


class numpy_ops:
    """The few `keras.ops` functions `log_likelihood` uses, on NumPy arrays."""

    log, exp, clip, cast = np.log, np.exp, np.clip, staticmethod(lambda x, t: x.astype(t))
    convert_to_tensor = staticmethod(np.asarray)

    @staticmethod
    def logsumexp(x, axis, keepdims=False):
        top = x.max(axis=axis, keepdims=True)
        out = top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))
        return out if keepdims else np.squeeze(out, axis)

    @staticmethod
    def one_hot(x, n):
        return np.eye(n)[x]

    sum = staticmethod(np.sum)


def predicted_mean_gap(y_pred):
    """The mean of the predicted log-normal mixture: sum_m w_m exp(mu_m + sigma_m^2 / 2)."""
    logits, means, log_scales, _ = split_parameters(y_pred)
    weights = np.exp(logits - numpy_ops.logsumexp(logits, -1, keepdims=True))
    variances = np.exp(2 * np.clip(log_scales, *LOG_SCALE_RANGE))
    return np.sum(weights * np.exp(means + 0.5 * variances), -1)


def build(kind):
    inputs = keras.Input((None, NUM_TYPES + 1))
    hidden = encoder(inputs, kind, summarize=False, causal=True)
    outputs = keras.layers.Dense(3 * COMPONENTS + NUM_TYPES, name="next_event")(hidden)
    return keras.Model(inputs, outputs, name=f"{kind}_point_process")


def standardize_log_gaps(x, mean, std):
    x = x.copy()
    real = x[..., 0] != PAD
    x[..., -1] = np.where(real, (x[..., -1] - mean) / std, PAD)
    return x


def evaluate(y_pred, y, w):
    real = w > 0
    time_part, type_part = log_likelihood(y.astype("float64"), y_pred.astype("float64"), numpy_ops)
    errors = predicted_mean_gap(y_pred.astype("float64")) - y[..., 0]
    _, _, _, type_logits = split_parameters(y_pred)
    return {
        "log_likelihood": float((time_part + type_part)[real].mean()),
        "time_log_likelihood": float(time_part[real].mean()),
        "type_log_likelihood": float(type_part[real].mean()),
        "time_rmse": float(np.sqrt((errors[real] ** 2).mean())),
        "type_accuracy": float((type_logits.argmax(-1) == y[..., 1])[real].mean()),
    }


def run_one(kind, train, test, seed, args):
    keras.utils.set_random_seed(seed)
    model = build(kind)
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss=negative_log_likelihood)
    start = time.perf_counter()
    model.fit(
        train[0],
        train[1],
        sample_weight=train[2],
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=True,
        verbose=2 if args.quick else 0,
    )
    seconds = time.perf_counter() - start
    y_pred = model.predict(test[0], batch_size=256, verbose=0)
    metrics = evaluate(y_pred, test[1], test[2])
    return {**metrics, "seconds": seconds, "params": model.count_params()}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    x, y, w, sequences = make_data(args.sequences)
    cut = int(0.8 * len(x))
    real = x[:cut, :, 0] != PAD
    log_gaps = x[:cut, :, -1][real]
    x = standardize_log_gaps(x, log_gaps.mean(), log_gaps.std())
    train, test = (x[:cut], y[:cut], w[:cut]), (x[cut:], y[cut:], w[cut:])
    lengths = [len(times) for times, _ in sequences]
    print(
        f"Hawkes process: {len(x)} sequences ({cut} train), {np.mean(lengths):.0f} events on "
        f"average (from {min(lengths)} to {max(lengths)})"
    )
    truth = [true_log_likelihood(*s) for s in sequences[cut:]]
    oracle = {
        "time_log_likelihood": float(np.concatenate([t for t, _ in truth]).mean()),
        "type_log_likelihood": float(np.concatenate([k for _, k in truth]).mean()),
    }
    oracle["log_likelihood"] = oracle["time_log_likelihood"] + oracle["type_log_likelihood"]
    print(f"  true process    log-likelihood per event {oracle['log_likelihood']:.3f}")
    results = [{"model": "true process", **{k: [v] for k, v in oracle.items()}}]
    for kind in args.models:
        runs = [run_one(kind, train, test, seed, args) for seed in args.seeds]
        row = {key: [r[key] for r in runs] for key in runs[0] if key not in ("seconds", "params")}
        row.update(
            model=kind,
            params=runs[0]["params"],
            seconds=float(np.median([r["seconds"] for r in runs])),
            seeds=args.seeds,
            epochs=args.epochs,
        )
        results.append(row)
        print(f"  {kind:15s} log-likelihood per event {mean_std(row['log_likelihood'])}")
    paths = save(results, args)
    return {"results": results, **paths}


def save(results, args):
    stem = os.path.join(args.output_dir, "event_forecasting")
    columns = [
        ("log_likelihood", "log-likelihood / event"),
        ("time_log_likelihood", "time part"),
        ("type_log_likelihood", "type part"),
        ("time_rmse", "next-time RMSE"),
        ("type_accuracy", "next-type accuracy"),
    ]
    lines = [
        "| model | " + " | ".join(title for _, title in columns) + " | parameters | time per run |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for row in results:
        cells = [mean_std(row[key]) if key in row else "-" for key, _ in columns]
        params = row.get("params", "-")
        seconds = f"{row['seconds']:.0f} s" if "seconds" in row else "-"
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {params} | {seconds} |")
    return write_outputs(stem, results, lines, plot)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["model"] for r in results]
    for ax, key, title in zip(
        axes,
        ("log_likelihood", "time_log_likelihood", "type_log_likelihood"),
        ("log-likelihood per event", "time part", "type part"),
    ):
        ax.bar(
            names,
            [np.mean(r[key]) for r in results],
            yerr=[np.std(r[key]) for r in results],
            capsize=3,
            color=["gray"] + [f"C{i}" for i in range(len(names) - 1)],
        )
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=15)
    axes[0].set_ylabel("test, nats (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
