"""Packed against padded: training on series of very different lengths without computing padding.

Title: Packing variable-length series for training, on PickupGestureWiimoteZ
Description: train the same Aaren classifier twice from the same weights, once on series padded
to the longest and masked, once on series packed into rows with `keras_aaren.pack_sequences`,
check that both models predict alike with the same weights, and compare the tokens each
computes, the time per epoch and the test accuracy over several seeds.

Run:

    python examples/packed_classification.py             # seeds 0 1 2, 100 epochs
    python examples/packed_classification.py --quick     # a few series, 2 epochs, one seed
    KERAS_BACKEND=jax python examples/packed_classification.py

PickupGestureWiimoteZ (UCR: one channel, 10 gestures, 50 training and 50 test series of 29 to
361 samples) ships inside the `aeon` wheel; nothing is downloaded. Outputs:
`outputs/packed_classification.{json,md,png}`.
"""

import argparse
import os
import time

import keras
import numpy as np
from aeon.datasets import load_classification

from baselines import mean_std, write_outputs
from keras_aaren import Aaren, AarenBlock, pack_sequences, unpack_sequences

DATASET = "PickupGestureWiimoteZ"
MODES = ("padded", "packed")
# Padded timesteps carry this value and `keras.layers.Masking` masks them; the inputs are
# standardised, so no real sample comes near it.
PAD = -1e4
QUICK = {"train": 12, "test": 8, "epochs": 2, "seeds": [0], "width": 16, "heads": 2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="series per padded batch")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = QUICK["epochs"], QUICK["seeds"]
        args.width, args.heads = QUICK["width"], QUICK["heads"]
    return args


"""
## The data

aeon gives each series as a `(channels, timesteps)` array; Keras' sequence layers want timesteps
first. The samples are standardised with the training set's mean and standard deviation.
"""


def load(quick=False):
    """`{"train": (series, labels), "test": ...}`, lists of float32 `(length, 1)` arrays and int
    labels, and the number of classes."""
    splits = {}
    for split in ("train", "test"):
        x, y = load_classification(DATASET, split=split)
        limit = QUICK[split] if quick else None
        splits[split] = ([np.asarray(s, "float32").T for s in x][:limit], list(map(str, y))[:limit])
    train = np.concatenate(splits["train"][0])
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-8
    # Classes from both splits: a --quick subset of the training set may miss some.
    classes = sorted(set(splits["train"][1]) | set(splits["test"][1]))
    data = {
        split: ([(s - mean) / std for s in series], np.array([classes.index(c) for c in labels]))
        for split, (series, labels) in splits.items()
    }
    return data, len(classes)


"""
## Two ways to batch series of different lengths

**Padded**: every series padded at its end to the longest training series and masked, as
`examples/uea_classification.py` does. Most of what a step computes is then padding: the series
hold 29 to 361 samples.

**Packed**: `pack_sequences` places several series in each row of the longest series' length,
with `segment_ids` that keep them apart: each series gets the outputs it gets alone. The label
sits on each series' last token, whose `sample_weight` is 1 (0 elsewhere), so a per-token loss
reduced with `mean_with_sample_weight` is the mean over the series, as padded.

Both modes take the same number of optimizer steps per epoch: the packed rows are split into as
many batches as the padded series, so a step holds as many series on average.
"""


def pad(series, length):
    """`(len(series), length, features)`, each series at the start of its row, `PAD` after it."""
    out = np.full((len(series), length, series[0].shape[1]), PAD, dtype="float32")
    for i, s in enumerate(series):
        out[i, : len(s)] = s
    return out


def layouts(data, batch_size):
    """Each mode's `fit` arguments and test inputs, and its real and computed tokens."""
    (series, labels), (test_series, _) = data["train"], data["test"]
    longest, steps = max(len(s) for s in series), -(-len(series) // batch_size)
    real = sum(len(s) for s in series)
    packed = pack_sequences(series, longest, labels, targets_per="sequence")
    test = pack_sequences(test_series, max(longest, max(len(s) for s in test_series)))
    return {
        "padded": {
            "fit": {"x": pad(series, longest), "y": labels, "batch_size": batch_size},
            "test": pad(test_series, max(len(s) for s in test_series)),
            "tokens": (real, len(series) * longest),
        },
        "packed": {
            "fit": {
                "x": packed.x,
                "y": packed.y,
                "sample_weight": packed.sample_weight,
                "batch_size": -(-packed.num_rows // steps),
            },
            "test": test.x,
            "unpack": test,
            "tokens": (real, packed.num_rows * longest),
        },
    }


def predict(model, layout):
    """`(test series, classes)` probabilities; packed rows are read at each series' last token."""
    probabilities = model.predict(layout["test"], batch_size=256, verbose=0)
    if "unpack" in layout:
        return unpack_sequences(probabilities, layout["unpack"], last_token=True)
    return probabilities


"""
## The model

`Dense(width)` → `AarenBlock` → `Aaren` → `Dense(classes, softmax)`, the same layers in both
modes. Padded, `keras.layers.Masking` marks the padding and `Aaren` returns its output at the
last real token; packed, both recurrent layers read `segment_ids` and return every token's
output. No dropout: an `AarenBlock` draws one dropout mask per row, which the series of a packed
row would share.
"""


def build(mode, num_classes, args):
    inputs = keras.Input((None, 1), name="inputs")
    key_dim = args.width // args.heads
    block = AarenBlock(args.heads, key_dim, ffn_dim=2 * args.width, name="aaren_block")
    aaren = Aaren(args.heads, key_dim, return_sequences=mode == "packed", name="aaren")
    head = keras.layers.Dense(num_classes, activation="softmax", name="classes")
    projection = keras.layers.Dense(args.width, name="input_projection")
    if mode == "padded":
        x = projection(keras.layers.Masking(mask_value=PAD)(inputs))
        return keras.Model(inputs, head(aaren(block(x))), name="padded")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    x = block(projection(inputs), segment_ids=segment_ids)
    outputs = head(aaren(x, segment_ids=segment_ids))
    return keras.Model({"inputs": inputs, "segment_ids": segment_ids}, outputs, name="packed")


"""
## Same weights, same predictions

Before training, the packed model takes the padded model's weights: every test series must get
the same class probabilities, packed or padded, up to float32 rounding.
"""


def largest_difference(num_classes, plans, args):
    keras.utils.set_random_seed(args.seeds[0])
    padded, packed = build("padded", num_classes, args), build("packed", num_classes, args)
    packed.set_weights(padded.get_weights())
    got = [predict(model, plans[mode]) for mode, model in zip(MODES, (padded, packed))]
    return float(np.abs(got[0] - got[1]).max())


"""
## Training

For each seed, both modes start from the same initial weights and train with Adam for the same
epochs. A callback records each epoch's wall time; the first epoch compiles, so the time per
epoch is the median of the others. The progress bars show the first seed's runs.
"""


class EpochTimes(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def train(mode, num_classes, weights, plan, test_labels, seed, args):
    keras.utils.set_random_seed(seed)
    model = build(mode, num_classes, args)
    model.set_weights(weights)
    # Padded: the mean over the batch's series. Packed: the weighted mean over the batch's
    # tokens, whose weights are 1 on each series' last token: the mean over its series too.
    reduction = "sum_over_batch_size" if mode == "padded" else "mean_with_sample_weight"
    loss = keras.losses.SparseCategoricalCrossentropy(reduction=reduction)
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss=loss)
    times = EpochTimes()
    verbose = 1 if seed == args.seeds[0] else 0
    if verbose:
        print(f"seed {seed}, {mode}:")
    history = model.fit(
        **plan["fit"], epochs=args.epochs, shuffle=True, callbacks=[times], verbose=verbose
    )
    p = predict(model, plan).astype("float64")
    return {
        "seconds_per_epoch": float(np.median(times.seconds[1:] or times.seconds)),
        "accuracy": float((p.argmax(-1) == test_labels).mean()),
        "loss": float(-np.log(np.maximum(p[np.arange(len(p)), test_labels], 1e-12)).mean()),
        "history": history.history["loss"],
    }


"""
## Results

Real ÷ computed tokens is what padding wastes; the time per epoch and the real tokens per second
are what packing buys; the test accuracy and cross-entropy (mean ± std over the seeds) show that
the packed model learns what the padded one does.
"""


def report(plans, runs, args):
    """The table's rows, printed and written with the figure; returns the rows and the paths."""
    backend, results = keras.backend.backend(), []
    lines = [
        "| backend | mode | real ÷ computed tokens | time per epoch | real tokens per second "
        "| test accuracy | test loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        real, computed = plans[mode]["tokens"]
        seconds = float(np.median([run["seconds_per_epoch"] for run in runs[mode]]))
        row = {"mode": mode, "backend": backend, "real_tokens": real, "tokens": computed}
        row |= {"seconds_per_epoch": seconds, "runs": runs[mode], "seeds": args.seeds}
        results.append(row)
        accuracy, loss = ([run[k] for run in runs[mode]] for k in ("accuracy", "loss"))
        lines.append(
            f"| {backend} | {mode} | {real / computed:.3f} | {1000 * seconds:.0f} ms "
            f"| {real / seconds:,.0f} | {mean_std(accuracy)} | {mean_std(loss, 2)} |"
        )
    stem = os.path.join(args.output_dir, "packed_classification")
    return results, write_outputs(stem, results, lines, plot)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    data, num_classes = load(args.quick)
    plans = layouts(data, args.batch_size)
    max_diff = largest_difference(num_classes, plans, args)
    print(f"same weights, largest difference of the test probabilities: {max_diff:.1e}")
    runs = {mode: [] for mode in MODES}
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        weights = build("padded", num_classes, args).get_weights()
        # Alternate which mode trains first, so that a slow spell of the machine falls on both.
        for mode in MODES if seed % 2 == 0 else MODES[::-1]:
            run = train(mode, num_classes, weights, plans[mode], data["test"][1], seed, args)
            runs[mode].append(run)
    results, paths = report(plans, runs, args)
    return {"results": results, "max_diff": max_diff, **paths}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row in results:
        curves.plot(np.mean([run["history"] for run in row["runs"]], axis=0), label=row["mode"])
    curves.set(xlabel="epoch", ylabel="training loss (mean over seeds)", title=DATASET)
    curves.legend()
    bars.bar([r["mode"] for r in results], [1000 * r["seconds_per_epoch"] for r in results])
    bars.set(ylabel="time per epoch (ms, median)", title=f"{results[0]['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
