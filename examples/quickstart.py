"""Quickstart: classify motions with Aaren, then serve the same weights token by token.

Title: Aaren on BasicMotions (UEA multivariate time-series classification)
Description: train a small Aaren model in parallel, check its test accuracy, then replay the test
sequences one timestep at a time through `keras.layers.RNN(AarenCell)` with the very same weights,
and show that the streaming predictions equal the parallel ones.

Run:

    python examples/quickstart.py            # full run, 60 epochs, every timestep streamed
    python examples/quickstart.py --quick    # a few epochs, 25 timesteps streamed: the test suite

BasicMotions (4 activities, 6 accelerometer/gyroscope channels, 100 timesteps) ships inside the
`aeon` wheel; nothing is downloaded.
"""

import argparse
import os
import time

import keras
import numpy as np
from aeon.datasets import load_basic_motions

import keras_aaren
from keras_aaren import Aaren


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few epochs, 25 timesteps streamed (smoke tests)"
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs")
    return parser.parse_args(argv)


def load_data():
    # aeon returns (cases, channels, timesteps); Keras sequence layers want (cases, timesteps,
    # channels). Standardize each channel with the training statistics only.
    x_train, y_train = load_basic_motions(split="train")
    x_test, y_test = load_basic_motions(split="test")
    x_train = np.transpose(x_train, (0, 2, 1)).astype("float32")
    x_test = np.transpose(x_test, (0, 2, 1)).astype("float32")
    mean = x_train.mean(axis=(0, 1))
    std = x_train.std(axis=(0, 1))
    classes = sorted(str(c) for c in set(y_train))
    encode = {name: i for i, name in enumerate(classes)}
    # Shuffle once so that validation_split holds out every class, not the last one.
    order = np.random.default_rng(0).permutation(len(x_train))
    return (
        ((x_train - mean) / std)[order],
        np.array([encode[str(c)] for c in y_train])[order],
        (x_test - mean) / std,
        np.array([encode[str(c)] for c in y_test]),
        classes,
    )


def build_model(features, num_classes, width=32):
    inputs = keras.Input((None, features))
    hidden = keras.layers.Dense(width)(inputs)
    hidden = Aaren(num_heads=4, key_dim=8, return_sequences=True, name="aaren_1")(hidden)
    hidden = keras.layers.LayerNormalization()(hidden)
    hidden = Aaren(num_heads=4, key_dim=8, name="aaren_2")(hidden)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(hidden)
    return keras.Model(inputs, outputs, name="aaren_classifier")


def build_streaming_model(model, batch_size, features):
    # The same layers, with each Aaren replaced by keras.layers.RNN stepping its cell: the cell
    # objects (and so the weights) are shared, only the computation changes.
    inputs = keras.Input(batch_shape=(batch_size, None, features))
    hidden = model.layers[1](inputs)
    hidden = keras.layers.RNN(
        model.get_layer("aaren_1").cell, return_sequences=True, stateful=True
    )(hidden)
    hidden = model.layers[3](hidden)
    hidden = keras.layers.RNN(
        model.get_layer("aaren_2").cell, return_sequences=True, stateful=True
    )(hidden)
    return keras.Model(inputs, model.layers[-1](hidden), name="aaren_streaming")


def train(x_train, y_train, num_classes, epochs):
    """The classifier trained in parallel, a quarter of the training cases held out."""
    model = build_model(x_train.shape[-1], num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        validation_split=0.25,
        epochs=epochs,
        batch_size=8,
        verbose=2,
    )
    return model, history


def main(argv=None):
    args = parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    x_train, y_train, x_test, y_test, classes = load_data()
    print(f"BasicMotions: train {x_train.shape}, test {x_test.shape}, classes {classes}")

    start = time.perf_counter()
    model, history = train(x_train, y_train, len(classes), epochs)
    train_seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(
        f"test accuracy: {accuracy:.3f} ({model.count_params()} parameters, "
        f"{epochs} epochs in {train_seconds:.1f} s)"
    )

    # Stream the test set one timestep at a time, as if it arrived from the sensors, and compare
    # every intermediate prediction with the parallel model run on the same prefix.
    streaming = build_streaming_model(model, len(x_test), x_test.shape[-1])
    keras_aaren.reset_states(streaming)
    steps = x_test.shape[1]
    if args.quick:
        # On JAX each eager call of keras.layers.RNN compiles its loop again, so streaming all
        # 100 timesteps is mostly compilation; the smoke run streams a prefix.
        steps = min(steps, 25)
    # Calling the model, rather than predict_on_batch, continues the stream on every backend:
    # JAX's compiled predict drops the states of keras.layers.RNN (see docs/backends.md).
    streamed = np.stack(
        [keras.ops.convert_to_numpy(streaming(x_test[:, t : t + 1]))[:, 0] for t in range(steps)],
        axis=1,
    )
    checkpoints = sorted({1, steps // 4, steps // 2, steps})
    parallel = {t: keras.ops.convert_to_numpy(model(x_test[:, :t])) for t in checkpoints}
    max_diff = max(float(np.abs(streamed[:, t - 1] - parallel[t]).max()) for t in checkpoints)
    print(f"streaming vs parallel, largest difference in class probabilities: {max_diff:.2e}")

    accuracy_by_step = (streamed.argmax(-1) == y_test[:, None]).mean(axis=0)
    plot_path = os.path.join(args.output_dir, "quickstart.png")
    plot(history.history, accuracy_by_step, plot_path)
    print(f"saved {plot_path}")
    return {"accuracy": accuracy, "max_diff": max_diff, "plot": plot_path}


def plot(history, accuracy_by_step, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(history["loss"], label="train loss")
    left.plot(history["val_loss"], label="validation loss")
    left.set_xlabel("epoch")
    left.set_title("Training (parallel scan)")
    left.legend()
    right.plot(np.arange(1, len(accuracy_by_step) + 1), accuracy_by_step)
    right.set_xlabel("timesteps received")
    right.set_ylabel("test accuracy")
    right.set_ylim(0, 1.05)
    right.set_title("Streaming: prediction as each timestep arrives")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
