"""The exported one-token step in edge runtimes: LiteRT and ONNX Runtime, float32 to int8.

Run (defaults: 4 layers of width 64, 4 heads of 16, one stream, one thread; TensorFlow):

    python -m benchmarks.edge               # latency at tokens 16 and 16384, 100000-token soak
    python -m benchmarks.edge --quick       # tiny sizes, a few seconds of streaming

Two models of the same width and depth, four `AarenBlock`s and a stack of four
`keras.layers.LSTM`s, are exported with `keras_aaren.streaming.export_tflite` and
`export_onnx` in every precision those take (LiteRT: float32, float16, dynamic int8, full int8
calibrated on `--calibration` random sequences of 32 tokens; ONNX Runtime: float32, dynamic
int8) and each file serves one stream of `--tokens` random tokens, a call per token with the
state passed back in, in LiteRT's interpreter (`ai-edge-litert`, `num_threads=1`) or an
ONNX Runtime session (one intra-op and one inter-op thread).

Reported per model and variant: the file size, the state in bytes, the p50 and p99 per-token
latency at token 16 and at token `--late`, the largest |y| of the stream and its largest
distance from the LiteRT float32 step's y at the same tokens. The latencies are timed after the
stream from the states kept before those tokens, `--rounds` rounds of `--window` calls, each
round starting one (variant, position) further along, so that a slow spell of a shared machine
is spread over all of them (as in `benchmarks.streaming`).

It refuses to report (exit status 1) unless every float32 step reproduces its Keras model run
over a 32-token sequence at once, and unless every variant's outputs and state stay finite over
the whole stream (Aaren's running sums grow with every token: the soak checks that no precision
lets them overflow). Results go to `<output-dir>/edge.json`.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import keras
import numpy as np

from benchmarks.common import (
    in_turns,
    machine,
    refuse_if_wrong,
    require_backend,
    sequence_model,
    write_json,
)
from keras_aaren.streaming import export_onnx, export_tflite

# The token (counted from 1) whose latency stands for the start of the stream.
START = 16
# (runtime, quantization) of every exported step; the first is the reference of the others.
VARIANTS = (
    ("litert", None),
    ("litert", "float16"),
    ("litert", "dynamic_int8"),
    ("litert", "full_int8"),
    ("onnxruntime", None),
    ("onnxruntime", "dynamic_int8"),
)
KINDS = ("aaren", "lstm")
QUICK = {
    "tokens": 200,
    "late": 128,
    "width": 16,
    "heads": 2,
    "depth": 2,
    "window": 4,
    "rounds": 1,
    "calibration": 2,
}


def variant_name(runtime, quantization):
    return f"{runtime}_{quantization or 'float32'}"


class LiteRTStep:
    """A `.tflite` step in LiteRT's interpreter, one thread."""

    def __init__(self, path):
        from ai_edge_litert.interpreter import Interpreter

        self.runner = Interpreter(model_path=path, num_threads=1).get_signature_runner()
        details = self.runner.get_input_details()
        self.shapes = {name: tuple(d["shape"]) for name, d in details.items() if name != "x"}

    def __call__(self, x, states):
        out = self.runner(x=x, **states)
        return out["y"], {name: out[f"new_{name}"] for name in states}


class OnnxStep:
    """A `.onnx` step in an ONNX Runtime session, one intra-op and one inter-op thread."""

    def __init__(self, path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        inputs = self.session.get_inputs()
        self.shapes = {i.name: tuple(i.shape) for i in inputs if i.name != "x"}
        self.outputs = ["y"] + [f"new_{name}" for name in self.shapes]

    def __call__(self, x, states):
        y, *new = self.session.run(self.outputs, {"x": x, **states})
        return y, dict(zip(states, new))


def export(model, kind, runtime, quantization, folder, calibration):
    # One file per model and variant: LiteRT maps its file, so a file rewritten under a live
    # interpreter would crash it.
    name = f"{kind}_{variant_name(runtime, quantization)}"
    if runtime == "litert":
        path = export_tflite(
            model,
            os.path.join(folder, f"{name}.tflite"),
            1,
            quantization=quantization,
            representative_data=calibration if quantization == "full_int8" else None,
        )
        return path, LiteRTStep(path)
    path = export_onnx(model, os.path.join(folder, f"{name}.onnx"), 1, quantization=quantization)
    return path, OnnxStep(path)


def zero_states(step):
    return {name: np.zeros(shape, "float32") for name, shape in step.shapes.items()}


def replay(step, xs):
    """The step's outputs over `xs` `(T, 1, width)` from zero states, `(T, width)`."""
    states, outputs = zero_states(step), []
    for x in xs:
        y, states = step(x, states)
        outputs.append(y[0])
    return np.stack(outputs)


def stream(step, xs, keep_at, reference=None):
    """Serve `xs` from zero states: the states kept before the positions `keep_at` (0-based),
    the largest |y|, the largest |y - reference| at the same tokens, and whether everything
    stayed finite."""
    states, kept = zero_states(step), {}
    largest, distance, finite = 0.0, 0.0, True
    outputs = None if reference is not None else np.empty((len(xs), xs.shape[-1]), "float32")
    for t, x in enumerate(xs):
        if t in keep_at:
            kept[t] = dict(states)
        y, states = step(x, states)
        finite = finite and bool(np.isfinite(y).all())
        largest = max(largest, float(np.abs(y).max()))
        if reference is None:
            outputs[t] = y[0]
        else:
            distance = max(distance, float(np.abs(y[0] - reference[t]).max()))
    finite = finite and all(np.isfinite(s).all() for s in states.values())
    return kept, largest, distance, finite, outputs


def latencies_at(steps, snapshots, width, rounds, calls, seed=1):
    """Seconds per token of each (variant, position), timed in turns from the kept states."""
    xs = np.random.default_rng(seed).normal(size=(calls, 1, width)).astype("float32")
    keys = [(name, where) for name in steps for where in snapshots[name]]
    samples = {key: [] for key in keys}
    for name, where in in_turns(keys, rounds):
        step, saved = steps[name], snapshots[name][where]
        for x in xs:
            start = time.perf_counter()
            step(x, saved)
            samples[name, where].append(time.perf_counter() - start)
    return samples


def main(argv=None):
    """Run the benchmark; return the exit status (1 when it refuses to report)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens of the soak stream")
    parser.add_argument("--late", type=int, default=16384, help="the late token timed")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--window", type=int, default=64, help="calls per turn of the timing")
    parser.add_argument("--rounds", type=int, default=9, help="turns of the timing per position")
    parser.add_argument("--calibration", type=int, default=8, help="sequences for full_int8")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: " + str(QUICK))
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    for name in ("window", "rounds", "calibration"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1. Received: {getattr(args, name)}")
    if not START < args.late <= args.tokens:
        parser.error(
            f"--late must be more than {START} and at most --tokens. "
            f"Received: --late {args.late} with --tokens {args.tokens}"
        )
    # The exports convert TensorFlow graphs.
    require_backend(parser, "edge", ("tensorflow",))

    rng = np.random.default_rng(0)
    check = rng.normal(size=(1, 32, args.width)).astype("float32")
    calibration = rng.normal(size=(args.calibration, 32, args.width)).astype("float32")
    xs = rng.normal(size=(args.tokens, 1, args.width)).astype("float32")
    positions = {"start": START - 1, "late": args.late - 1}

    results, steps, snapshots, errors, infinite = {}, {}, {}, {}, []
    # The runtimes map their files: the folder lives until the timing is done.
    holder = tempfile.TemporaryDirectory()
    folder = holder.name
    for kind in args.kinds:
        model = sequence_model(kind, args.width, args.heads, args.depth)
        expected = keras.ops.convert_to_numpy(model(check))[0]
        reference = None
        for runtime, quantization in VARIANTS:
            name = f"{kind}/{variant_name(runtime, quantization)}"
            path, step = export(model, kind, runtime, quantization, folder, calibration)
            if quantization is None:
                errors[name] = float(np.abs(replay(step, check[0][:, None]) - expected).max())
            kept, largest, distance, finite, outputs = stream(
                step, xs, set(positions.values()), reference
            )
            if reference is None:
                reference = outputs
            if not finite:
                infinite.append(name)
            steps[name] = step
            snapshots[name] = {where: kept[t] for where, t in positions.items()}
            results[name] = {
                "file_bytes": os.path.getsize(path),
                "state_bytes": sum(4 * int(np.prod(s)) for s in step.shapes.values()),
                "max_abs_y": largest,
                "max_abs_y_minus_float32": distance,
            }
            print(f"{name}: exported and streamed {args.tokens} tokens", flush=True)
    if refuse_if_wrong(errors, "its Keras model over the whole sequence"):
        return 1
    for name in infinite:
        print(f"{name} left the finite range within {args.tokens} tokens: not reporting.")
    if infinite:
        return 1

    samples = latencies_at(steps, snapshots, args.width, args.rounds, args.window)
    for name, row in results.items():
        for where, token in (("start", START), ("late", args.late)):
            times = samples[name, where]
            row[f"p50_ms_at_{token}"] = 1000 * statistics.median(times)
            row[f"p99_ms_at_{token}"] = 1000 * float(np.percentile(times, 99))
        print(
            f"{name:28s} {row['file_bytes']:9d} B file, {row['state_bytes']:6d} B state; "
            f"p50/p99 at token {START}: {row[f'p50_ms_at_{START}']:.3f}/"
            f"{row[f'p99_ms_at_{START}']:.3f} ms, at token {args.late}: "
            f"{row[f'p50_ms_at_{args.late}']:.3f}/{row[f'p99_ms_at_{args.late}']:.3f} ms; "
            f"max |y| {row['max_abs_y']:.3g}, max |y - float32| "
            f"{row['max_abs_y_minus_float32']:.3g} over {args.tokens} tokens",
            flush=True,
        )
    record = {
        "protocol": vars(args) | {"float32_max_error": max(errors.values()), "errors": errors},
        "machine": machine(),
        "results": results,
    }
    path = write_json(record, args.output_dir, "edge.json", indent=1)
    print(f"wrote {path}")
    steps.clear()  # the runtimes let go of their files before the folder goes
    holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
