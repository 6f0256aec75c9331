"""Time-series classification: Aaren blocks against a Transformer encoder and an LSTM.

Title: Multivariate time-series classification on UEA/UCR datasets with AarenBlock
Description: train the same small classifier three ways (a stack of `AarenBlock`s, a Transformer
encoder of the same width and depth built on `keras.layers.MultiHeadAttention`, and an LSTM
stack) on five UEA/UCR archive datasets that ship inside the `aeon` wheel, over several seeds,
and tabulate mean ± std test accuracy, parameters and training time.

Run:

    python examples/uea_classification.py              # all datasets, 3 seeds, 100 epochs
    python examples/uea_classification.py --quick      # one dataset, seed and epoch, few cases
    python examples/uea_classification.py --datasets GunPoint --seeds 0 1 2 3 4

Datasets (aeon's own loader reads the `.ts` files inside the wheel; nothing is downloaded):

* BasicMotions (UEA): 6 channels, 100 steps, 4 classes, 40 train / 40 test.
* JapaneseVowels (UEA): 12 channels, 7 to 29 steps, 9 classes, 270 / 370.
* GunPoint (UCR): 1 channel, 150 steps, 2 classes, 50 / 150.
* ItalyPowerDemand (UCR): 1 channel, 24 steps, 2 classes, 67 / 1029.
* PickupGestureWiimoteZ (UCR): 1 channel, 29 to 361 steps, 10 classes, 50 / 50.

Variable-length series are padded at the end and masked, never truncated. Outputs:
`outputs/uea_classification.{json,md,png}`.
"""

import argparse
import os
import time

import keras
import numpy as np
from aeon.datasets import load_classification

from baselines import MODELS, encoder, mean_std, pad, write_outputs

DATASETS = (
    "BasicMotions",
    "JapaneseVowels",
    "GunPoint",
    "ItalyPowerDemand",
    "PickupGestureWiimoteZ",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one dataset, seed and epoch")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds, args.epochs = ["JapaneseVowels"], [0], 1
    return args


def load(name):
    """Train and test splits as padded `(cases, timesteps, channels)` arrays and int labels."""
    splits = {}
    for split in ("train", "test"):
        # aeon gives (cases, channels, timesteps), or a list of (channels, timesteps) arrays
        # when the lengths differ; Keras sequence layers want timesteps first.
        x, y = load_classification(name, split=split)
        splits[split] = ([np.asarray(case, "float32").T for case in x], y)
    train_cases = np.concatenate(splits["train"][0])
    # Standardize each channel with training statistics only.
    mean, std = train_cases.mean(axis=0), train_cases.std(axis=0) + 1e-8
    classes = sorted(set(str(c) for c in splits["train"][1]))
    encode = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, (cases, labels) in splits.items():
        out[split] = (
            pad([(case - mean) / std for case in cases]),
            np.array([encode[str(c)] for c in labels]),
        )
    return out, classes


def build(kind, features, num_classes):
    inputs = keras.Input((None, features))
    # Aaren reads out the mean over tokens, as the Transformer does. Its last-token output carries
    # the last token's position encoding, which on sets of very different lengths lets the
    # classifier fit the length (PickupGestureWiimoteZ: 0.61 against 0.73 with the mean).
    summary = encoder(inputs, kind, readout="mean")
    outputs = keras.layers.Dense(num_classes, activation="softmax")(summary)
    return keras.Model(inputs, outputs, name=f"{kind}_classifier")


def run_one(kind, data, num_classes, seed, args):
    keras.utils.set_random_seed(seed)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    model = build(kind, x_train.shape[-1], num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    # A fixed budget of epochs and no early stopping: these training sets have 40 to 270 cases,
    # too few to hold out a validation set worth selecting on.
    model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=True,
        verbose=2 if args.quick else 0,
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return {"accuracy": float(accuracy), "seconds": seconds, "params": model.count_params()}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    results = []
    for name in args.datasets:
        data, classes = load(name)
        if args.quick:
            # Two full training batches and one test batch: a smoke run compiles few shapes.
            data = {split: (x[:n], y[:n]) for (split, (x, y)), n in zip(data.items(), (32, 64))}
        shape = data["train"][0].shape
        print(f"{name}: train {shape}, test {data['test'][0].shape}, {len(classes)} classes")
        for kind in args.models:
            runs = [run_one(kind, data, len(classes), seed, args) for seed in args.seeds]
            row = {
                "dataset": name,
                "model": kind,
                "accuracies": [r["accuracy"] for r in runs],
                "params": runs[0]["params"],
                "seconds": float(np.median([r["seconds"] for r in runs])),
                "seeds": args.seeds,
                "epochs": args.epochs,
            }
            results.append(row)
            print(
                f"  {kind:12s} accuracy {mean_std(row['accuracies'])} "
                f"({row['params']} parameters, {row['seconds']:.1f} s per run)"
            )
    paths = save(results, args)
    return {"results": results, **paths}


def save(results, args):
    stem = os.path.join(args.output_dir, "uea_classification")
    lines = [
        "| dataset | model | test accuracy (mean ± std) | parameters | training time per run |",
        "|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['dataset']} | {row['model']} | {mean_std(row['accuracies'])} "
            f"| {row['params']} | {row['seconds']:.0f} s |"
        )
    return write_outputs(stem, results, lines, plot)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    models = list(dict.fromkeys(r["model"] for r in results))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.8 * len(datasets) + 2, 3.8))
    for j, kind in enumerate(models):
        rows = [r for d in datasets for r in results if r["dataset"] == d and r["model"] == kind]
        ax.bar(
            np.arange(len(datasets)) + (j - (len(models) - 1) / 2) * width,
            [np.mean(r["accuracies"]) for r in rows],
            width,
            yerr=[np.std(r["accuracies"]) for r in rows],
            capsize=3,
            label=kind,
        )
    ax.set_xticks(np.arange(len(datasets)), datasets, rotation=15)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Mean ± std over seeds {results[0]['seeds']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
