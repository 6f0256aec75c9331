"""Streaming forecasts: train Aaren blocks in parallel, then serve them one reading at a time.

Title: Streaming one-step-ahead forecasting of atmospheric CO2 with AarenBlock
Description: train a small stack of `AarenBlock`s on the Mauna Loa weekly CO2 series (shipped
inside the `statsmodels` wheel) like a Transformer, convert it into an explicit-state step
function, and feed the test years one weekly reading at a time as if they came from the sensor:
each new reading updates the forecast of the next one, in constant time and memory.

Run:

    python examples/streaming_co2.py            # full run, 40 epochs
    python examples/streaming_co2.py --quick    # a smoke run, for the test suite

Outputs: the test-set error of the streamed forecasts next to a naive "same as last week"
forecast, the largest difference between streamed and parallel forecasts, per-reading latency,
the state size (which never grows), and `outputs/streaming_co2.png`.
"""

import argparse
import os
import time

import keras
import numpy as np
import statsmodels.datasets.co2 as co2

from keras_aaren import AarenBlock, streaming


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run for the tests")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs")
    return parser.parse_args(argv)


def load_series():
    # Weekly CO2 at Mauna Loa, 1958-2001, in ppm; 59 missing weeks are interpolated in time.
    frame = co2.load_pandas().data
    return frame["co2"].interpolate(method="time").to_numpy("float32"), frame.index


def windows(changes, length, stride):
    # Inputs are weekly changes and the target at each step is next week's change: changes are
    # stationary, while the level keeps rising past anything seen in training.
    starts = range(0, len(changes) - length - 1, stride)
    inputs = np.stack([changes[s : s + length] for s in starts])
    targets = np.stack([changes[s + 1 : s + length + 1] for s in starts])
    return inputs[..., None], targets[..., None]


def build_model(width=32):
    return keras.Sequential(
        [
            keras.Input((None, 1)),
            keras.layers.Dense(width),
            AarenBlock(num_heads=4, key_dim=8, ffn_dim=64, norm_first=True),
            AarenBlock(num_heads=4, key_dim=8, ffn_dim=64, norm_first=True),
            keras.layers.Dense(1),
        ],
        name="aaren_forecaster",
    )


def prepare():
    """The series, its dates, the first test week, the weekly changes, their scale, and the
    training windows of scaled changes."""
    series, dates = load_series()
    split = int(0.75 * len(series))
    changes = np.diff(series, prepend=series[0])
    scale = changes[1:split].std()
    x_train, y_train = windows(changes[:split] / scale, length=128, stride=8)
    print(
        f"CO2: {len(series)} weeks, training on {dates[0]:%Y}-{dates[split]:%Y} "
        f"({len(x_train)} windows), streaming {dates[split]:%Y}-{dates[-1]:%Y}"
    )
    return series, dates, split, changes, scale, x_train, y_train


def train(x_train, y_train, epochs):
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
    model.fit(x_train, y_train, epochs=epochs, batch_size=16, verbose=2)
    return model


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    series, dates, split, changes, scale, x_train, y_train = prepare()
    model = train(x_train, y_train, 2 if args.quick else args.epochs)

    # Serve: a compiled explicit-state step. The state is a fixed set of (1, size) arrays.
    step = streaming.make_step_function(model, batch_size=1)
    states = step.initial_states()
    state_bytes = sum(s.size * s.itemsize for s in states)
    end = len(series) if not args.quick else split + 100
    stream = changes[:end] / scale
    forecasts, latencies, sizes = [], [], []
    for t, value in enumerate(stream):
        start = time.perf_counter()
        change, states = step(np.array([[value]], "float32"), states)
        latencies.append(time.perf_counter() - start)
        sizes.append(sum(int(np.prod(s.shape)) * 4 for s in states))
        forecasts.append(series[t] + scale * float(keras.ops.convert_to_numpy(change)[0, 0]))
    forecasts = np.array(forecasts)

    # The same weights in parallel over the whole stream give the same forecasts.
    parallel = keras.ops.convert_to_numpy(model(stream[None, :, None]))[0, :, 0]
    max_diff = float(np.abs(series[:end] + scale * parallel - forecasts).max())
    print(f"streamed vs parallel forecasts, largest difference: {max_diff:.2e} ppm")

    # The forecast made at week t is for week t + 1; score the test part in ppm.
    truth = series[split + 1 : end]
    mae = float(np.abs(forecasts[split : end - 1] - truth).mean())
    naive_mae = float(np.abs(series[split : end - 1] - truth).mean())
    latency_ms = 1000 * np.array(latencies[5:])
    print(f"test MAE: {mae:.3f} ppm (naive 'same as last week': {naive_mae:.3f} ppm)")
    print(
        f"per-reading latency: median {np.median(latency_ms):.2f} ms, "
        f"p99 {np.percentile(latency_ms, 99):.2f} ms over {len(latency_ms)} readings"
    )
    print(
        f"state size: {state_bytes} bytes at the start, {min(sizes)}-{max(sizes)} bytes "
        f"after every reading"
    )

    path = os.path.join(args.output_dir, "streaming_co2.png")
    plot(dates, series[:end], forecasts, split, latency_ms, sizes, path)
    print(f"saved {path}")
    return {
        "mae": mae,
        "naive_mae": naive_mae,
        "max_diff": max_diff,
        "state_sizes": sorted(set(sizes)),
        "plot": path,
    }


def plot(dates, observed, forecasts, split, latency_ms, sizes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5))
    shown = slice(split, len(observed) - 1)
    top.plot(dates[split + 1 : len(observed)], observed[split + 1 :], label="observed", lw=1.2)
    top.plot(
        dates[split + 1 : len(observed)],
        forecasts[shown],
        label="streamed forecast",
        lw=1.0,
        alpha=0.8,
    )
    top.set_ylabel("CO2 (ppm)")
    top.set_title("One-week-ahead forecasts, updated as each reading arrives")
    top.legend()
    bottom.plot(np.arange(len(latency_ms)), latency_ms, lw=0.6, label="latency per reading")
    bottom.set_xlabel("readings streamed")
    bottom.set_ylabel("ms")
    bottom.set_ylim(0, max(1.0, float(np.percentile(latency_ms, 99.5)) * 1.5))
    bottom.set_title(f"Per-reading latency; state size fixed at {sizes[0]} bytes")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
