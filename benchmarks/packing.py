"""Packed against padded training on real variable-length data: PickupGestureWiimoteZ.

Run:

    python -m benchmarks.packing                     # 3 seeds, 100 epochs, both modes
    python -m benchmarks.packing --quick             # a few sequences, 2 epochs, one seed
    KERAS_BACKEND=jax python -m benchmarks.packing

The data: PickupGestureWiimoteZ (UCR), one channel, 10 classes, 50 training and 50 test series
of 29 to 361 samples, read by aeon from the `.ts` files inside its wheel (nothing is
downloaded), standardised with the training set's mean and standard deviation.

The model, the same in both modes: `Dense(width)` -> `AarenBlock` -> `Aaren` -> `Dense(classes,
softmax)` at each sequence's last token, no dropout (an `AarenBlock` draws one dropout mask per
row, which the sequences of a packed row would share). It is trained twice per seed, from the
same initial weights, with the same optimizer, epochs and number of steps per epoch:

* **padded**: every series padded at its end to the longest training series and masked
  (`keras.layers.Masking`, as `examples/uea_classification.py` does); `Aaren` returns its output
  at the last real token; batches of `--batch-size` series.
* **packed**: `keras_aaren.pack_sequences(..., targets_per="sequence")` into rows of
  `--row-length` tokens (default: the longest training series, the padded mode's length, so a
  step of either mode computes rows of one shape and only the number of rows differs); both
  recurrent layers read `segment_ids`; the per-token cross-entropy is weighted by the packed
  `sample_weight` (1 on each series' last token) and reduced with `mean_with_sample_weight`, so
  a step's loss is the mean over its series, as padded. A batch holds as many rows as give the
  padded mode's number of steps per epoch, so both take as many optimizer steps per epoch and
  the same mean number of series per step.

Before timing anything it checks that the two models, given the same weights, predict the same
class probabilities for every test series (packed rows unpacked at each series' last token), and
refuses to report (exit status 1) if they differ by more than 1e-4.

Reported per mode: real tokens over the tokens computed per epoch, the time per epoch (median
over the epochs after the first, which compiles), real tokens per second, and the test accuracy
and cross-entropy after the last epoch (mean ± standard deviation over the seeds).

An epoch of this set is a few steps, so fixed costs weigh on its time; three figures separate
them from the tokens. Each epoch's time inside its training steps, and the rest (what Keras does
between epochs). A line `a + b * rows` fitted to every step after the first epoch of both
modes: `a` is what a step costs whatever its rows (dispatch, optimizer, callbacks), `b` what
each row adds. And one `train_on_batch` of each mode on `--batch-size` rows of the same length,
timed in turns (`--equal-rows-repeats` each): what a row costs with segment ids against a mask.
`--repeat K` trains on the training set repeated K times per epoch, which leaves each step's
share of fixed cost as it is but spreads each epoch's own over K times the steps.

The target: packed time per epoch at most 1.25 × (real tokens ÷ padded tokens) × padded time
per epoch, with the packed mean test accuracy within one standard deviation of the padded runs'
accuracies (`numpy.std` over the seeds, as the examples' tables print it) of their mean.

Results go to `<output-dir>/packing.json` and `packing.png`.
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
    write_json,
)
from keras_aaren import Aaren, AarenBlock, pack_sequences, unpack_sequences

DATASET = "PickupGestureWiimoteZ"
MODES = ("padded", "packed")
# Padded timesteps carry this value and `keras.layers.Masking` masks them; the inputs are
# standardised, so no real sample comes near it.
PAD = -1e4
# How far the packed model's probabilities may be from the padded model's, same weights.
TOLERANCE = 1e-4
# The target: packed epoch time over padded at most this times real over padded tokens.
TIME_FACTOR = 1.25
QUICK = {"train": 12, "test": 8, "epochs": 2, "seeds": [0], "width": 16, "heads": 2}


def load(limit=None):
    """`{"train": (series, labels), "test": ...}`: lists of float32 `(length, 1)` arrays,
    standardised with the training samples, and int labels; `limit` series per split at most."""
    from aeon.datasets import load_classification

    splits = {}
    for split in ("train", "test"):
        # aeon gives a list of (channels, timesteps) arrays when the lengths differ.
        x, y = load_classification(DATASET, split=split)
        series = [np.asarray(case, "float32").T for case in x]
        splits[split] = (series[:limit], [str(label) for label in y][:limit])
    train = np.concatenate(splits["train"][0])
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-8
    # Classes from both splits: a --quick subset of the training set may miss some.
    classes = sorted(set(splits["train"][1]) | set(splits["test"][1]))
    encode = {c: i for i, c in enumerate(classes)}
    data = {
        split: ([(s - mean) / std for s in series], np.array([encode[c] for c in labels]))
        for split, (series, labels) in splits.items()
    }
    return data, len(classes)


def pad(series, length):
    """`(len(series), length, features)`, each series at the start of its row, `PAD` after it."""
    out = np.full((len(series), length, series[0].shape[1]), PAD, dtype="float32")
    for i, s in enumerate(series):
        out[i, : len(s)] = s
    return out


def build(mode, features, num_classes, args):
    """The classifier of `mode`: padded, `(B, T, features)` with `PAD` -> `(B, classes)`;
    packed, `{"inputs", "segment_ids"}` -> `(B, T, classes)`, each token's prediction."""
    inputs = keras.Input((None, features), name="inputs")
    key_dim = args.width // args.heads
    block = AarenBlock(args.heads, key_dim, ffn_dim=2 * args.width, name="aaren_block")
    aaren = Aaren(args.heads, key_dim, return_sequences=mode == "packed", name="aaren")
    head = keras.layers.Dense(num_classes, activation="softmax", name="classes")
    if mode == "padded":
        x = keras.layers.Masking(mask_value=PAD)(inputs)
        x = keras.layers.Dense(args.width, name="input_projection")(x)
        outputs = head(aaren(block(x)))
        return keras.Model(inputs, outputs, name="padded")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    x = keras.layers.Dense(args.width, name="input_projection")(inputs)
    x = block(x, segment_ids=segment_ids)
    outputs = head(aaren(x, segment_ids=segment_ids))
    return keras.Model({"inputs": inputs, "segment_ids": segment_ids}, outputs, name="packed")


def compiled(mode, features, num_classes, args, weights=None):
    """`build(mode, ...)`, with `weights` if given, compiled for training."""
    model = build(mode, features, num_classes, args)
    if weights is not None:
        model.set_weights(weights)
    # Padded: the mean over the batch's series. Packed: the weighted mean over the batch's
    # tokens, whose weights are 1 on each series' last token: the mean over its series too.
    reduction = "sum_over_batch_size" if mode == "padded" else "mean_with_sample_weight"
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(reduction=reduction),
    )
    return model


class Layout:
    """One mode's arrays: what `model.fit` trains on and how the test set is read back."""

    def __init__(self, mode, data, args):
        # Padded, the training series tiled `args.repeat` times; packed, their rows tiled alike.
        series, labels = data["train"]
        test_series, self.test_labels = data["test"]
        self.real_tokens = sum(len(s) for s in series) * args.repeat
        longest = max(len(s) for s in series)
        padded_steps = -(-len(series) * args.repeat // args.batch_size)
        if mode == "padded":
            x = pad(series, longest)
            self.fit_args = (np.tile(x, (args.repeat, 1, 1)), np.tile(labels, args.repeat))
            self.fit_kwargs = {"batch_size": args.batch_size}
            self.rows = len(series) * args.repeat
            self.row_length = longest
            self.test_x = pad(test_series, max(len(s) for s in test_series))
            self.test_packed = None
        else:
            row_length = args.row_length or longest
            packed = pack_sequences(series, row_length, labels, targets_per="sequence")
            tile = (args.repeat,) + (1,) * (packed.inputs.ndim - 1)
            x = {name: np.tile(a, tile[: a.ndim]) for name, a in packed.x.items()}
            y = np.tile(packed.y, (args.repeat, 1))
            weight = np.tile(packed.sample_weight, (args.repeat, 1))
            self.fit_args = (x, y)
            self.rows = packed.num_rows * args.repeat
            self.row_length = row_length
            # As many steps per epoch as padded: the rows split into that many batches.
            batch_rows = -(-self.rows // padded_steps)
            self.fit_kwargs = {"batch_size": batch_rows, "sample_weight": weight}
            test_length = max(row_length, max(len(s) for s in test_series))
            self.test_packed = pack_sequences(test_series, test_length)
            self.test_x = self.test_packed.x
        self.tokens = self.rows * self.row_length
        self.steps = -(-self.rows // self.fit_kwargs["batch_size"])

    def predict(self, model):
        """`(test series, classes)` probabilities, each series' at its last token."""
        probabilities = model.predict(self.test_x, batch_size=256, verbose=0)
        if self.test_packed is None:
            return probabilities
        return unpack_sequences(probabilities, self.test_packed, last_token=True)

    def score(self, model):
        """Test accuracy and mean cross-entropy, computed alike for both modes."""
        p = self.predict(model).astype("float64")
        chosen = p[np.arange(len(self.test_labels)), self.test_labels]
        accuracy = float((p.argmax(axis=-1) == self.test_labels).mean())
        return accuracy, float(-np.log(np.maximum(chosen, 1e-12)).mean())


class StepTimes(keras.callbacks.Callback):
    """The wall time of every epoch and of every training step, with the step's rows."""

    def __init__(self, batch_size, rows):
        super().__init__()
        self.batch_size, self.rows = batch_size, rows
        self.epochs, self.steps = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.step_index = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.step_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # On TensorFlow's CPU the step has run by now; on JAX, whose dispatch is asynchronous, a
        # step's time can land in the next one's, but an epoch's steps add up to the whole.
        rows = min(self.batch_size, self.rows - self.step_index * self.batch_size)
        self.steps.append((len(self.epochs), rows, time.perf_counter() - self.step_start))
        self.step_index += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.perf_counter() - self.epoch_start)


def equivalence_error(data, num_classes, args):
    """The largest difference between the padded and the packed model's test probabilities,
    the packed model given the padded model's initial weights."""
    keras.utils.set_random_seed(args.seeds[0])
    padded = build("padded", 1, num_classes, args)
    packed = build("packed", 1, num_classes, args)
    packed.set_weights(padded.get_weights())
    got = {
        mode: Layout(mode, data, args).predict(model)
        for mode, model in (("padded", padded), ("packed", packed))
    }
    return float(np.abs(got["padded"] - got["packed"]).max())


def train(mode, layout, num_classes, weights, args):
    """One run of `mode` from `weights`: the figures of its epochs, steps and test score."""
    model = compiled(mode, 1, num_classes, args, weights)
    times = StepTimes(layout.fit_kwargs["batch_size"], layout.rows)
    model.fit(
        *layout.fit_args,
        epochs=args.epochs,
        shuffle=True,
        callbacks=[times],
        verbose=0,
        **layout.fit_kwargs,
    )
    accuracy, loss = layout.score(model)
    return {
        "epoch_seconds": times.epochs,
        "steps": times.steps,
        "test_accuracy": accuracy,
        "test_loss": loss,
    }


def equal_rows_ms(layouts, num_classes, args):
    """Median milliseconds of one `train_on_batch` of each mode on `args.batch_size` rows of
    the same length, timed in turns: what a row costs packed (segments) and padded (a mask)."""
    keras.utils.set_random_seed(args.seeds[0])
    weights = build("padded", 1, num_classes, args).get_weights()
    batches = {}
    for mode, layout in layouts.items():
        model = compiled(mode, 1, num_classes, args, weights)
        x, y = layout.fit_args
        take = np.arange(args.batch_size) % layout.rows
        if mode == "padded":
            batch = (x[take], y[take])
        else:
            weight = layout.fit_kwargs["sample_weight"]
            batch = ({k: v[take] for k, v in x.items()}, y[take], weight[take])
        model.train_on_batch(*batch)  # compiles
        batches[mode] = (model, batch)
    samples = {mode: [] for mode in layouts}
    for mode in in_turns(layouts, 2 * args.equal_rows_repeats):
        model, batch = batches[mode]
        start = time.perf_counter()
        model.train_on_batch(*batch)
        samples[mode].append(1000 * (time.perf_counter() - start))
    return {mode: statistics.median(ms) for mode, ms in samples.items()}


def step_cost(runs):
    """Least squares of step seconds against rows, `seconds = a + b * rows`, over the steps
    after the first epoch of every run given: `{"a_ms", "b_ms_per_row"}`."""
    points = [(rows, s) for run in runs for epoch, rows, s in run["steps"] if epoch > 0]
    rows = np.array([p[0] for p in points], dtype="float64")
    seconds = np.array([p[1] for p in points])
    if len(set(rows.tolist())) < 2:
        return {"a_ms": None, "b_ms_per_row": None}
    b, a = np.polyfit(rows, seconds, 1)
    return {"a_ms": 1000 * float(a), "b_ms_per_row": 1000 * float(b)}


def summarise(layout, runs):
    """One mode's row of the table from its layout and its runs over the seeds."""
    per_epoch = [statistics.median(run["epoch_seconds"][1:]) for run in runs]
    seconds = statistics.median(per_epoch)
    # Each epoch's time inside its training steps, and the rest: what Keras does once per
    # epoch (a new iterator over the shuffled arrays, callbacks), whatever the tokens.
    in_steps = [
        sum(s for epoch, _, s in run["steps"] if epoch == e)
        for run in runs
        for e in range(1, len(run["epoch_seconds"]))
    ]
    rest = [
        run["epoch_seconds"][e] - sum(s for epoch, _, s in run["steps"] if epoch == e)
        for run in runs
        for e in range(1, len(run["epoch_seconds"]))
    ]
    accuracies = [run["test_accuracy"] for run in runs]
    losses = [run["test_loss"] for run in runs]
    step_ms = [1000 * s for run in runs for epoch, _, s in run["steps"] if epoch > 0]
    return {
        "rows": layout.rows,
        "row_length": layout.row_length,
        "batch_size": layout.fit_kwargs["batch_size"],
        "steps_per_epoch": layout.steps,
        "real_tokens": layout.real_tokens,
        "tokens": layout.tokens,
        "real_fraction": layout.real_tokens / layout.tokens,
        "seconds_per_epoch": seconds,
        "seconds_per_epoch_per_seed": per_epoch,
        "median_step_ms": statistics.median(step_ms),
        "seconds_in_steps_per_epoch": statistics.median(in_steps),
        "seconds_outside_steps_per_epoch": statistics.median(rest),
        "real_tokens_per_second": layout.real_tokens / seconds,
        "test_accuracy_mean": float(np.mean(accuracies)),
        "test_accuracy_std": float(np.std(accuracies)),
        "test_loss_mean": float(np.mean(losses)),
        "test_loss_std": float(np.std(losses)),
    }


def targets(results):
    """The two targets, packed against padded: `{name: {"value", "limit", "met"}}`."""
    padded, packed = results["padded"], results["packed"]
    real_over_padded = padded["real_tokens"] / padded["tokens"]
    time_ratio = packed["seconds_per_epoch"] / padded["seconds_per_epoch"]
    difference = abs(packed["test_accuracy_mean"] - padded["test_accuracy_mean"])
    found = {
        "packed_over_padded_epoch_time": {
            "value": time_ratio,
            "limit": TIME_FACTOR * real_over_padded,
        },
        "accuracy_difference": {"value": difference, "limit": padded["test_accuracy_std"]},
    }
    for target in found.values():
        target["met"] = target["value"] <= target["limit"]
    return found


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: " + str(QUICK))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="series per padded batch")
    parser.add_argument(
        "--row-length", type=int, help="tokens per packed row (default: the longest series)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="the training set this many times per epoch"
    )
    parser.add_argument(
        "--equal-rows-repeats",
        type=int,
        default=20,
        help="timed training steps per mode on --batch-size rows each",
    )
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "repeat", "equal_rows_repeats", "width", "heads"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1. Received: {value}")
    if args.epochs < 2 and not args.quick:
        parser.error(
            "--epochs must be at least 2: the first epoch compiles and is not timed. "
            f"Received: {args.epochs}"
        )
    if args.quick:
        args.seeds, args.epochs = QUICK["seeds"], QUICK["epochs"]
        args.width, args.heads = QUICK["width"], QUICK["heads"]
        args.equal_rows_repeats = 2
    if args.width % args.heads:
        parser.error(
            f"--width must be a multiple of --heads. Received: --width {args.width} with "
            f"--heads {args.heads}"
        )
    require_backend(parser, "packing")
    return args


def main(argv=None):
    """Run the benchmark; return the exit status (1 when it refuses to report)."""
    args = parse_args(argv)
    # The timing needs an otherwise idle machine: the record keeps the load it ran under.
    load_at_start = os.getloadavg()
    limit = (QUICK["train"], QUICK["test"]) if args.quick else (None, None)
    data, num_classes = load(limit[0])
    if args.quick:
        data["test"] = tuple(part[: limit[1]] for part in data["test"])
    longest = max(len(s) for s in data["train"][0])
    if args.row_length is not None and args.row_length < longest:
        print(
            f"--row-length must be at least the longest training series, {longest}. "
            f"Received: {args.row_length}"
        )
        return 2

    error = equivalence_error(data, num_classes, args)
    if refuse_if_wrong({"packed": error}, "the padded model with the same weights", TOLERANCE):
        return 1
    layouts = {mode: Layout(mode, data, args) for mode in MODES}
    for mode, layout in layouts.items():
        print(
            f"{mode:6s}: {layout.rows} rows of {layout.row_length} tokens, "
            f"{layout.real_tokens / layout.tokens:.1%} real; "
            f"{layout.steps} steps of {layout.fit_kwargs['batch_size']} rows per epoch",
            flush=True,
        )

    runs = {mode: [] for mode in MODES}
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        weights = build("padded", 1, num_classes, args).get_weights()
        # Alternate which mode trains first, so that a slow spell falls on both.
        order = MODES if seed % 2 == 0 else MODES[::-1]
        for mode in order:
            keras.utils.set_random_seed(seed)
            run = train(mode, layouts[mode], num_classes, weights, args)
            runs[mode].append(run)
            print(
                f"  seed {seed} {mode:6s}: {statistics.median(run['epoch_seconds'][1:]):.3f} s "
                f"per epoch (first {run['epoch_seconds'][0]:.1f} s), test accuracy "
                f"{run['test_accuracy']:.3f}, loss {run['test_loss']:.3f}",
                flush=True,
            )

    equal = equal_rows_ms(layouts, num_classes, args)
    results = {mode: summarise(layouts[mode], runs[mode]) for mode in MODES}
    cost = step_cost([run for mode in MODES for run in runs[mode]])
    found = targets(results)
    backend = keras.backend.backend()
    print(
        f"\n{DATASET}, {backend}, {args.epochs} epochs, seeds {args.seeds}; load average "
        f"{load_at_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end:"
    )
    print(
        "mode   | real/computed tokens | s per epoch (in steps + outside) | real tokens/s "
        "| accuracy | loss"
    )
    for mode, row in results.items():
        print(
            f"{mode:6s} | {row['real_fraction']:20.3f} | {row['seconds_per_epoch']:6.3f} "
            f"({row['seconds_in_steps_per_epoch']:.3f} + "
            f"{row['seconds_outside_steps_per_epoch']:.3f}) | "
            f"{row['real_tokens_per_second']:13.0f} | {row['test_accuracy_mean']:.3f} ± "
            f"{row['test_accuracy_std']:.3f} | {row['test_loss_mean']:.3f} ± "
            f"{row['test_loss_std']:.3f}"
        )
    in_steps = (
        results["packed"]["seconds_in_steps_per_epoch"]
        / results["padded"]["seconds_in_steps_per_epoch"]
    )
    print(f"packed over padded, time in steps per epoch: {in_steps:.3f}")
    print(
        f"a training step on {args.batch_size} rows of {layouts['padded'].row_length} tokens: "
        + ", ".join(f"{mode} {ms:.1f} ms" for mode, ms in equal.items())
    )
    if cost["a_ms"] is not None:
        print(
            f"a step: {cost['a_ms']:.1f} ms + {cost['b_ms_per_row']:.2f} ms per row of "
            f"{layouts['padded'].row_length} tokens"
        )
    for name, target in found.items():
        print(
            f"  {name:30s} {target['value']:.3f} (at most {target['limit']:.3f}): "
            f"{'met' if target['met'] else 'missed'}"
        )

    record = {
        "protocol": vars(args)
        | {
            "dataset": DATASET,
            "equivalence_error": error,
            "num_classes": num_classes,
            "train_lengths": [len(s) for s in data["train"][0]],
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "machine": machine(),
        "results": results,
        "step_cost": cost,
        "packed_over_padded_time_in_steps": in_steps,
        "equal_rows_step_ms": equal,
        "targets": found,
        "runs": runs,
    }
    path = write_json(record, args.output_dir, "packing.json", indent=1)
    plot(runs, layouts, f"{args.output_dir}/packing.png")
    print(f"wrote {path} and packing.png")
    return 0


def plot(runs, layouts, path):
    """Each training step's time against its rows, one colour per mode."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, mode_runs in runs.items():
        steps = [(rows, 1000 * s) for run in mode_runs for epoch, rows, s in run["steps"] if epoch]
        if steps:
            rows, ms = zip(*steps)
            ax.scatter(
                rows, ms, s=8, alpha=0.4, label=f"{mode} (rows of {layouts[mode].row_length})"
            )
    ax.set_xlabel("rows in the step")
    ax.set_ylabel("step time (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{DATASET}, steps after the first epoch ({keras.backend.backend()})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
