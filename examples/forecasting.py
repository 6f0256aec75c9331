"""Multi-step forecasting: Aaren blocks against a Transformer encoder, an LSTM and a seasonal naive.

Title: Multi-step forecasting of real series with AarenBlock
Description: read a window of past values, predict the next `horizon` values at once. The same
small forecaster is built three ways (a stack of `AarenBlock`s, a Transformer encoder of the same
width and depth, an LSTM stack) and compared with the seasonal naive forecast ("the same as one
season ago") on three real series that ship inside the `statsmodels` wheel, with MSE and MAE at
several horizons over several seeds.

Run:

    python examples/forecasting.py               # all series, 3 seeds, 30 epochs
    python examples/forecasting.py --quick       # one series, one seed, one epoch
    python examples/forecasting.py --series sunspots --seeds 0 1 2 3 4

Series (statsmodels' own loaders read the files inside the wheel; nothing is downloaded):

* `co2`: weekly CO2 at Mauna Loa, 1958-2001 (2284 weeks; 59 missing weeks interpolated in time);
  52 weeks of context give the next 52 weeks; season 52.
* `elnino`: monthly sea surface temperature of the Nino 1+2 region, 1950-2010 (732 months);
  48 months give the next 12; season 12.
* `sunspots`: yearly sunspot numbers, 1700-2008 (309 years); 44 years give the next 11; the
  solar cycle is about 11 years.

Each series is split in time: models train on windows whose targets lie in the first 80% and are
tested on every forecast origin in the last 20%. Inputs and targets are taken relative to the last
observed value and divided by the training part's standard deviation, so a trend does not leave
the training range; errors are reported in those units (the series' standard deviation).
Outputs: `outputs/forecasting.{json,md,png}`.
"""

import argparse
import os
import time

import keras
import numpy as np
import statsmodels.api as sm

from baselines import MODELS, encoder, mean_std, write_outputs

# name: (context, horizon, season)
SERIES = {"co2": (156, 52, 52), "elnino": (48, 12, 12), "sunspots": (44, 11, 11)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one series, seed and epoch")
    parser.add_argument("--series", nargs="+", default=list(SERIES), choices=list(SERIES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.series, args.seeds, args.epochs = ["sunspots"], [0], 1
    return args


def load_series(name):
    if name == "co2":
        frame = sm.datasets.co2.load_pandas().data
        return frame["co2"].interpolate(method="time").to_numpy("float32")
    if name == "elnino":
        # One row per year, one column per month: read it row by row into one monthly series.
        frame = sm.datasets.elnino.load_pandas().data
        return frame.drop(columns="YEAR").to_numpy("float32").reshape(-1)
    return sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy("float32")


def make_windows(series, context, horizon, origins, scale):
    """Inputs `(cases, context, 1)` and targets `(cases, horizon)` for each forecast origin (the
    index of the first value to forecast), relative to the last observed value."""
    last = np.array([series[o - 1] for o in origins])[:, None]
    inputs = np.stack([series[o - context : o] for o in origins]) - last
    targets = np.stack([series[o : o + horizon] for o in origins]) - last
    return (inputs / scale)[..., None].astype("float32"), (targets / scale).astype("float32")


def split(series, context, horizon):
    boundary = int(0.8 * len(series))
    train_origins = np.arange(context, boundary - horizon + 1)
    test_origins = np.arange(boundary, len(series) - horizon + 1)
    scale = float(np.std(series[:boundary]))
    return (
        make_windows(series, context, horizon, train_origins, scale),
        make_windows(series, context, horizon, test_origins, scale),
        test_origins,
        scale,
    )


def seasonal_naive(series, origins, horizon, season, scale):
    """The value one season before each target (or several seasons, beyond the first season),
    in the same relative units as the models' forecasts."""
    steps = np.arange(horizon)
    lags = season * (steps // season + 1)
    forecasts = np.stack([series[o + steps - lags] - series[o - 1] for o in origins])
    return (forecasts / scale).astype("float32")


def errors(forecasts, targets):
    """MSE and MAE at every horizon step, `(horizon,)` each."""
    return ((forecasts - targets) ** 2).mean(axis=0), np.abs(forecasts - targets).mean(axis=0)


def build(kind, horizon):
    inputs = keras.Input((None, 1))
    # Aaren's queries start at zero, so its attention starts as a running mean of the values and
    # training moves the scores from there: a lower error than the default N(0, 1) on elnino
    # and sunspots (docs/results.md).
    outputs = keras.layers.Dense(horizon)(encoder(inputs, kind, query_initializer="zeros"))
    return keras.Model(inputs, outputs, name=f"{kind}_forecaster")


def run_one(kind, train, test, horizon, seed, args):
    keras.utils.set_random_seed(seed)
    model = build(kind, horizon)
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss="mse")
    start = time.perf_counter()
    model.fit(
        *train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=True,
        verbose=2 if args.quick else 0,
    )
    seconds = time.perf_counter() - start
    forecasts = model.predict(test[0], batch_size=256, verbose=0)
    return forecasts, seconds, model.count_params()


def reported_steps(horizon):
    """The horizon steps the table shows: the next value, a quarter, half and all of it."""
    return sorted({1, max(1, horizon // 4), max(1, horizon // 2), horizon})


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    results = []
    examples = {}
    for name in args.series:
        context, horizon, season = SERIES[name]
        series = load_series(name)
        train, test, origins, scale = split(series, context, horizon)
        print(
            f"{name}: {len(series)} values, {len(train[0])} training windows, "
            f"{len(test[0])} test origins, context {context}, horizon {horizon}"
        )
        naive = seasonal_naive(series, origins, horizon, season, scale)
        rows = {"seasonal naive": ([errors(naive, test[1])], None, 0.0)}
        examples[name] = {"series": series, "origin": origins[len(origins) // 2], "scale": scale}
        examples[name]["seasonal naive"] = naive[len(origins) // 2]
        for kind in args.models:
            runs = [run_one(kind, train, test, horizon, seed, args) for seed in args.seeds]
            rows[kind] = (
                [errors(forecasts, test[1]) for forecasts, _, _ in runs],
                runs[0][2],
                float(np.median([seconds for _, seconds, _ in runs])),
            )
            examples[name][kind] = runs[0][0][len(origins) // 2]
        for model, (per_seed, params, seconds) in rows.items():
            row = {
                "series": name,
                "model": model,
                "horizon": horizon,
                "mse": [mse.tolist() for mse, _ in per_seed],
                "mae": [mae.tolist() for _, mae in per_seed],
                "params": params,
                "seconds": seconds,
                "seeds": args.seeds if params else [],
                "epochs": args.epochs if params else 0,
            }
            results.append(row)
            mse = [float(np.mean(m)) for m in row["mse"]]
            print(f"  {model:15s} MSE over the horizon {mean_std(mse)}")
    paths = save(results, examples, args)
    return {"results": results, **paths}


def summary(values, steps=None):
    """`mean ± std` over seeds of the error averaged over the horizon or at the given steps."""
    per_seed = np.array(values)
    chosen = per_seed.mean(axis=1) if steps is None else per_seed[:, steps].mean(axis=1)
    return mean_std(chosen)


def save(results, examples, args):
    stem = os.path.join(args.output_dir, "forecasting")
    lines = []
    for name in dict.fromkeys(r["series"] for r in results):
        rows = [r for r in results if r["series"] == name]
        steps = reported_steps(rows[0]["horizon"])
        lines += [
            "",
            f"**{name}** (MSE / MAE in training standard deviations; mean ± std over seeds)",
            "",
            "| model | "
            + " | ".join(f"MSE h={h}" for h in steps)
            + " | MSE all | MAE all | parameters | training time per run |",
            "|---|" + "---|" * (len(steps) + 4),
        ]
        for row in rows:
            cells = [summary(row["mse"], [h - 1]) for h in steps]
            cells += [summary(row["mse"]), summary(row["mae"])]
            params = row["params"] or "-"
            seconds = f"{row['seconds']:.0f} s" if row["params"] else "-"
            lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {params} | {seconds} |")
    return write_outputs(stem, results, lines, lambda rows, path: plot(rows, examples, path))


def plot(results, examples, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(examples)
    fig, axes = plt.subplots(2, len(names), figsize=(4.5 * len(names), 6.5), squeeze=False)
    for j, name in enumerate(names):
        top, bottom = axes[0, j], axes[1, j]
        for row in (r for r in results if r["series"] == name):
            steps = np.arange(1, row["horizon"] + 1)
            top.plot(steps, np.mean(row["mse"], axis=0), label=row["model"])
        top.set_xlabel("horizon step")
        top.set_ylabel("test MSE")
        top.set_title(name)
        top.legend(fontsize=8)
        # One forecast from the middle of the test period, back in the series' own units.
        example = examples[name]
        series, origin, scale = example["series"], example["origin"], example["scale"]
        context, horizon, _ = SERIES[name]
        for model in [r["model"] for r in results if r["series"] == name]:
            bottom.plot(
                np.arange(origin, origin + horizon),
                series[origin - 1] + scale * example[model],
                label=model,
            )
        bottom.plot(
            np.arange(origin - context, origin + horizon),
            series[origin - context : origin + horizon],
            color="black",
            linewidth=1,
            label="observed",
        )
        bottom.axvline(origin - 0.5, color="gray", linestyle=":")
        bottom.set_xlabel("time index")
        bottom.set_title(f"{name}: one test forecast, first seed")
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
