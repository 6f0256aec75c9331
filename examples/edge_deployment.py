"""Deploy the step to a device: LiteRT and ONNX Runtime, from float32 to int8.

Title: Serving Aaren's one-token step in LiteRT and ONNX Runtime, quantised
Author: the keras_aaren authors
Description: train the quickstart classifier (BasicMotions) and the CO2 forecaster, export
their one-token steps with `keras_aaren.streaming.export_tflite` and `export_onnx` in every
precision those take, replay the test data through LiteRT's interpreter and an ONNX Runtime
session one token at a time, and compare test accuracy, MAE and file size with the Keras
models. Then checkpoint a stream's state half-way, load it in a new interpreter, and resume.

Run:

    python examples/edge_deployment.py            # the examples' full training
    python examples/edge_deployment.py --quick    # a smoke run, for the test suite

Requires the TensorFlow backend (the exports convert TensorFlow graphs) and the deploy extra,
`pip install "keras_aaren[deploy]"`: `ai-edge-litert` (LiteRT's interpreter), `onnxruntime`,
`tf2onnx` and `onnx`. Outputs: `outputs/edge_deployment.{json,md,png}`.
"""

import argparse
import os
import tempfile

import keras
import numpy as np
import quickstart
import streaming_co2

from baselines import write_outputs
from keras_aaren.streaming import export_onnx, export_tflite
from keras_aaren.streaming.export import ONNX_QUANTIZATIONS, TFLITE_QUANTIZATIONS

# Every precision of each runtime: (runtime, quantization).
VARIANTS = tuple(("litert", q) for q in TFLITE_QUANTIZATIONS) + tuple(
    ("onnxruntime", q) for q in ONNX_QUANTIZATIONS
)
# The smoke run: both runtimes, and the calibrated quantization.
QUICK_VARIANTS = (("litert", None), ("litert", "full_int8"), ("onnxruntime", "dynamic_int8"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run for the tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs")
    return parser.parse_args(argv)


"""
## Running an exported step

An exported step is a file with one function, `[x, state_0, state_1, ...] -> [y, new_state_0,
new_state_1, ...]`: the token and the states before it in, the output and the states after it
out. The application holds the states between calls, as it would hold an LSTM's, and starts a
stream from zeros. Both runtimes read the names and shapes of the inputs from the file, so the
loader below needs nothing but the path. On a device the same calls run in LiteRT's Python
package, its C++ or Kotlin interpreter, or ONNX Runtime's mobile builds.
"""


class ExportedStep:
    """A `.tflite` step in LiteRT's interpreter or an `.onnx` step in ONNX Runtime, one thread:
    `step(x, states) -> (y, states)`, the states a dict `{state_i: array}`."""

    def __init__(self, path):
        if path.endswith(".tflite"):
            from ai_edge_litert.interpreter import Interpreter

            runner = Interpreter(model_path=path, num_threads=1).get_signature_runner()
            shapes = {n: d["shape"] for n, d in runner.get_input_details().items()}

            def run(inputs):
                out = runner(**inputs)
                return out["y"], {n: out[f"new_{n}"] for n in inputs if n != "x"}

        else:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(path, options, ["CPUExecutionProvider"])
            shapes = {i.name: i.shape for i in session.get_inputs()}
            names = ["y"] + [f"new_{n}" for n in shapes if n != "x"]

            def run(inputs):
                y, *states = session.run(names, inputs)
                return y, dict(zip([n for n in shapes if n != "x"], states))

        self.run = run
        self.state_shapes = {n: tuple(s) for n, s in shapes.items() if n != "x"}

    def initial_states(self):
        return {n: np.zeros(shape, "float32") for n, shape in self.state_shapes.items()}

    def __call__(self, x, states):
        return self.run({"x": np.asarray(x, "float32"), **states})


def replay(step, xs, states=None):
    """Feeds `xs` `(batch, T, features)` one token at a time: the outputs `(batch, T, ...)`
    and the states after the last token."""
    states = step.initial_states() if states is None else states
    outputs = []
    for t in range(xs.shape[1]):
        y, states = step(xs[:, t], states)
        outputs.append(y)
    return np.stack(outputs, axis=1), states


def export(model, folder, name, runtime, quantization, batch_size, representative):
    """The step of `model` in `runtime` and `quantization`: its path and its file size."""
    precision = quantization or "float32"
    if runtime == "litert":
        path = export_tflite(
            model,
            os.path.join(folder, f"{name}_{precision}.tflite"),
            batch_size,
            quantization=quantization,
            # Full-integer quantization calibrates its ranges on training data.
            representative_data=representative if quantization == "full_int8" else None,
        )
    else:
        path = export_onnx(
            model,
            os.path.join(folder, f"{name}_{precision}.onnx"),
            batch_size,
            quantization=quantization,
        )
    return path, os.path.getsize(path)


"""
## The classifier: test accuracy

The quickstart's two `Aaren` layers on BasicMotions, trained as in `quickstart.py`. The
exported step serves the 40 test recordings side by side (a batch of 40 streams), one timestep
at a time; the class is read from the output after the last timestep. The calibration of
`full_int8` replays the training recordings.
"""


def classifier_rows(folder, args):
    x_train, y_train, x_test, y_test, classes = quickstart.load_data()
    model, _ = quickstart.train(x_train, y_train, len(classes), 3 if args.quick else 60)
    expected = keras.ops.convert_to_numpy(model.predict(x_test, verbose=0))
    keras_accuracy = float((expected.argmax(-1) == y_test).mean())
    print(f"classifier: Keras test accuracy {keras_accuracy:.3f}")
    rows = []
    for runtime, quantization in QUICK_VARIANTS if args.quick else VARIANTS:
        path, size = export(
            model, folder, "classifier", runtime, quantization, len(x_test), x_train
        )
        outputs, _ = replay(ExportedStep(path), x_test)
        probabilities = outputs[:, -1]
        accuracy = float((probabilities.argmax(-1) == y_test).mean())
        rows.append(
            {
                "model": "quickstart classifier",
                "runtime": runtime,
                "precision": quantization or "float32",
                "file_bytes": size,
                "metric": "test accuracy",
                "value": accuracy,
                "keras_value": keras_accuracy,
                "max_abs_difference": float(np.abs(probabilities - expected).max()),
            }
        )
        print(f"  {runtime} {quantization or 'float32'}: accuracy {accuracy:.3f}, {size} bytes")
    return rows


"""
## The forecaster: test MAE

The CO2 forecaster of `streaming_co2.py`, two pre-norm `AarenBlock`s, trained on weekly
changes and served one weekly reading at a time from 1958 to 2001; the MAE of the next week's
forecast, in ppm, over the test years. The calibration of `full_int8` replays 32 training
windows.
"""


def forecaster_rows(folder, args):
    series, _, split, changes, scale, x_train, y_train = streaming_co2.prepare()
    model = streaming_co2.train(x_train, y_train, 2 if args.quick else 40)
    end = split + 100 if args.quick else len(series)
    stream = (changes[:end] / scale)[None, :, None].astype("float32")
    truth = series[split + 1 : end]

    def mae(predicted_changes):
        forecasts = series[:end] + scale * predicted_changes  # week t's forecast of week t + 1
        return float(np.abs(forecasts[split : end - 1] - truth).mean())

    expected = keras.ops.convert_to_numpy(model(stream))[0, :, 0]
    keras_mae = mae(expected)
    print(f"forecaster: Keras test MAE {keras_mae:.4f} ppm")
    rows = []
    for runtime, quantization in QUICK_VARIANTS if args.quick else VARIANTS:
        # Calibration replays each window token by token through the Keras step: the smoke
        # run takes two.
        calibration = x_train[: 2 if args.quick else 32]
        path, size = export(model, folder, "forecaster", runtime, quantization, 1, calibration)
        outputs, _ = replay(ExportedStep(path), stream)
        value = mae(outputs[0, :, 0])
        rows.append(
            {
                "model": "CO2 forecaster",
                "runtime": runtime,
                "precision": quantization or "float32",
                "file_bytes": size,
                "metric": "test MAE (ppm)",
                "value": value,
                "keras_value": keras_mae,
                "max_abs_difference": float(np.abs(outputs[0, :, 0] - expected).max()),
            }
        )
        print(f"  {runtime} {quantization or 'float32'}: MAE {value:.4f} ppm, {size} bytes")
    resumed = checkpoint_and_resume(folder, stream)
    return rows, resumed


"""
## Checkpoint and resume

A device that restarts should not lose its stream. The state is a handful of small float32
arrays: save them with the position in the stream, and a new interpreter (after a reboot, on
another device) resumes from them exactly where the old one stopped. This is the contract of
`keras_aaren.streaming.save_states` / `load_states` for Keras models, with NumPy's `.npz`.
"""


def checkpoint_and_resume(folder, stream):
    path = os.path.join(folder, "forecaster_float32.tflite")
    whole, _ = replay(ExportedStep(path), stream)
    half = stream.shape[1] // 2
    _, states = replay(ExportedStep(path), stream[:, :half])
    checkpoint = os.path.join(folder, "forecaster_state.npz")
    np.savez(checkpoint, position=half, **states)

    with np.load(checkpoint) as saved:  # a new process, a new interpreter
        position = int(saved["position"])
        states = {n: saved[n] for n in saved.files if n != "position"}
    rest, _ = replay(ExportedStep(path), stream[:, position:], states)
    difference = float(np.abs(rest - whole[:, position:]).max())
    print(
        f"resumed at reading {position}: largest difference from the unbroken stream {difference}"
    )
    return difference


"""
## Results
"""


def table(rows):
    lines = [
        "| model | runtime | precision | file | of float32 | metric | value | Keras | change |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        float32 = [
            r["file_bytes"]
            for r in rows
            if (r["model"], r["runtime"], r["precision"])
            == (row["model"], row["runtime"], "float32")
        ]
        ratio = f"{row['file_bytes'] / float32[0]:.2f}" if float32 else "-"
        change = row["value"] - row["keras_value"]
        lines.append(
            f"| {row['model']} | {row['runtime']} | {row['precision']} | "
            f"{row['file_bytes'] / 1024:.1f} KiB | {ratio} | "
            f"{row['metric']} | {row['value']:.4f} | {row['keras_value']:.4f} | {change:+.4f} |"
        )
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        subset = [r for r in rows if r["model"] == model]
        labels = [f"{r['runtime']}\n{r['precision']}" for r in subset]
        bars = ax.bar(labels, [r["value"] for r in subset], color="tab:blue")
        ax.axhline(subset[0]["keras_value"], color="gray", linestyle=":", label="Keras model")
        for bar, r in zip(bars, subset):
            ax.annotate(
                f"{r['file_bytes'] / 1024:.0f} KiB",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_ylabel(subset[0]["metric"])
        ax.set_title(f"{model}: exported step, one token per call")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        raise SystemExit(
            "The exports convert TensorFlow graphs: run with KERAS_BACKEND=tensorflow. "
            f"Received: {keras.backend.backend()}"
        )
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        rows = classifier_rows(folder, args)
        forecaster, resumed = forecaster_rows(folder, args)
        rows += forecaster
    stem = os.path.join(args.output_dir, "edge_deployment")
    paths = write_outputs(stem, rows, table(rows), plot)
    return {"rows": rows, "resumed_difference": resumed, **paths}


if __name__ == "__main__":
    main()
