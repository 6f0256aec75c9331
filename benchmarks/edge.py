"""The exported one-token step in edge runtimes: LiteRT and ONNX Runtime, float32 to int8.

Run (defaults: 4 layers of width 64, 4 heads of 16, one stream, one thread; TensorFlow):

    python -m benchmarks.edge               # latency at tokens 16 and 16384, 100000-token soak
    python -m benchmarks.edge --quick       # tiny sizes, a few seconds of streaming

Four `AarenBlock`s and four `keras.layers.LSTM`s are exported with `streaming.export_tflite` and
`export_onnx` in every precision those take (LiteRT: float32, float16, dynamic int8, full int8
calibrated on 8 random sequences of 32 tokens; ONNX Runtime: float32, dynamic int8), and each
file serves one stream of `--tokens` random tokens, the state passed back in at every call, in
LiteRT's interpreter or an ONNX Runtime session, one thread. Beside them, the KV-cache
Transformer of `benchmarks.streaming`, exported (float32, Keras' `model.export`) once per cache
length timed, since LiteRT plans its memory for fixed shapes; the caller appends the keys and
values its step returns.

Reported: file and state (or cache) bytes, p50 and p99 latency per token at tokens 16 and
`--late`, timed in turns after the stream from the states kept before them (`--rounds` rounds
of `--window` calls), the largest |y| of the stream and its distance from the LiteRT float32
step's; then the tokens per second of 1, 64 and 1024 concurrent streams (one batch) for the
LiteRT float32 steps of Aaren and the LSTM stack.

It refuses to report (exit status 1) unless every float32 step reproduces its Keras model over
32 tokens and every variant's outputs and state stay finite over the whole stream (Aaren's
running sums grow with every token). Results go to `<output-dir>/edge.json`.
"""

import os
import statistics
import sys
import tempfile

import numpy as np

from benchmarks import common
from keras_aaren.streaming import export_onnx, export_tflite

START = 16  # the token, counted from 1, whose latency stands for the start of the stream
VARIANTS = (  # (runtime, quantization); the first is the reference of the others
    *(("litert", q) for q in (None, "float16", "dynamic_int8", "full_int8")),
    *(("onnxruntime", q) for q in (None, "dynamic_int8")),
)
KINDS = ("aaren", "lstm", "transformer_kv")
QUICK = {"tokens": 200, "late": 128, "width": 16, "heads": 2, "depth": 2, "window": 4}
QUICK |= {"rounds": 1, "calibration": 2, "streams": [1, 4]}


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
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(path, options, ["CPUExecutionProvider"])
        self.shapes = {i.name: tuple(i.shape) for i in self.session.get_inputs() if i.name != "x"}
        self.outputs = ["y"] + [f"new_{name}" for name in self.shapes]

    def __call__(self, x, states):
        y, *new = self.session.run(self.outputs, {"x": x, **states})
        return y, dict(zip(states, new))


def export(model, name, runtime, folder, quantization=None, calibration=None, batch=1):
    """`(path, step)` of `model` exported for `runtime`. One file per model and variant: LiteRT
    maps its file, so a file rewritten under a live interpreter would crash it."""
    if runtime == "litert":
        data = calibration if quantization == "full_int8" else None
        path = os.path.join(folder, f"{name}.tflite")
        export_tflite(model, path, batch, quantization=quantization, representative_data=data)
        return path, LiteRTStep(path)
    path = export_onnx(
        model, os.path.join(folder, f"{name}.onnx"), batch, quantization=quantization
    )
    return path, OnnxStep(path)


def export_transformer(model, runtime, folder, cache_length):
    """The KV-cache step with caches of `cache_length` entries, exported by `model.export`."""
    import tensorflow as tf

    step = common.transformer_step_model(model, cache_length)
    signature = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in step.inputs]
    path = os.path.join(folder, f"transformer_kv_{runtime}_{cache_length}")
    path += ".tflite" if runtime == "litert" else ".onnx"
    step.export(
        path,
        format="litert" if runtime == "litert" else "onnx",
        verbose=False,
        input_signature=[signature],
    )
    return path, (LiteRTStep if runtime == "litert" else OnnxStep)(path)


def zeros(step):
    return {name: np.zeros(shape, "float32") for name, shape in step.shapes.items()}


def main(argv=None):
    """Run the benchmark; return the exit status (1 when it refuses to report)."""
    parser = common.parser(__doc__, ("tensorflow",))  # the exports convert TensorFlow graphs
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens of the soak stream")
    parser.add_argument("--late", type=int, default=16384, help="the late token timed")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--window", type=int, default=64, help="calls per turn of the timing")
    parser.add_argument("--rounds", type=int, default=9, help="turns of the timing per position")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    args = common.parse(parser, argv, "width", "heads", "depth", "window", "rounds")
    args.calibration, args.streams = 8, [1, 64, 1024]
    for name, value in (QUICK if args.quick else {}).items():
        setattr(args, name, value)
    if not START < args.late <= args.tokens:
        parser.error(
            f"--late must be more than {START} and at most --tokens. Received: "
            f"--late {args.late} with --tokens {args.tokens}"
        )

    rng = np.random.default_rng(0)
    check = rng.normal(size=(1, 32, args.width)).astype("float32")
    calibration = rng.normal(size=(args.calibration, 32, args.width)).astype("float32")
    xs = rng.normal(size=(args.tokens, 1, args.width)).astype("float32")
    positions = {"start": START - 1, "late": args.late - 1}  # before these tokens, 0-based
    results, served, errors, infinite, models = {}, {}, {}, [], {}
    holder = tempfile.TemporaryDirectory()  # the runtimes map their files until the timing ends
    for kind in (k for k in args.kinds if k != "transformer_kv"):
        model = models[kind] = common.sequence_model(kind, args.width, args.heads, args.depth)
        expected, reference = common.to_host(model(check))[0], None
        for runtime, quantization in VARIANTS:
            name = f"{kind}/{runtime}_{quantization or 'float32'}"
            path, step = export(
                model, name.replace("/", "_"), runtime, holder.name, quantization, calibration
            )
            if quantization is None:
                replayed = common.serve(step, zeros(step), check[0][:, None]).outputs[:, 0]
                errors[name] = float(np.abs(replayed - expected).max())
            run = common.serve(step, zeros(step), xs, set(positions.values()))
            outputs = run.outputs[:, 0]
            reference = outputs if reference is None else reference
            if not all(np.isfinite(a).all() for a in [outputs, *run.states.values()]):
                infinite.append(name)
            for where, t in positions.items():
                served[name, where] = (step, run.kept[t])
            results[name] = {
                "file_bytes": os.path.getsize(path),
                "state_bytes": common.state_bytes(run.states),
                "max_abs_y": float(np.abs(outputs).max()),
                "max_abs_y_minus_float32": float(np.abs(outputs - reference).max()),
            }
            print(f"{name}: exported and streamed {args.tokens} tokens", flush=True)
    if "transformer_kv" in args.kinds:
        model = common.sequence_model("transformer_kv", args.width, args.heads, args.depth)
        expected = common.to_host(model(check))[0]
        step = common.kv_cache_step_function(model)
        stepped = common.serve(step, step.initial_states(), check[0][:, None], {START - 1})
        errors["transformer_kv/keras_steps"] = float(np.abs(stepped.outputs[:, 0] - expected).max())
        caches = {n: common.to_host(c) for n, c in stepped.kept[START - 1].items()}
        for runtime in ("litert", "onnxruntime"):
            name = f"transformer_kv/{runtime}_float32"
            _, step = export_transformer(model, runtime, holder.name, START - 1)
            y, _ = step(check[0, START - 1][None], caches)
            errors[name] = float(np.abs(y[0] - expected[START - 1]).max())
            results[name] = {}
            for where, t in positions.items():
                # The token at position t attends to t cached entries and its own.
                path, step = export_transformer(model, runtime, holder.name, t)
                cache = {n: rng.normal(size=s).astype("float32") for n, s in step.shapes.items()}
                served[name, where] = (step, cache)
                results[name] |= {"file_bytes": os.path.getsize(path)}
                results[name][f"state_bytes_at_{t + 1}"] = common.state_bytes(cache)
            print(f"{name}: exported with caches of {sorted(positions.values())} entries")
    if common.refuse_if_wrong(errors, "its Keras model over the whole sequence"):
        return 1
    for name in infinite:
        print(f"{name} left the finite range within {args.tokens} tokens: not reporting.")
    if infinite:
        return 1

    samples = common.step_latencies(served, args.width, args.rounds, args.window)
    for name, row in results.items():
        for where, token in (("start", START), ("late", args.late)):
            times = 1000 * np.asarray(samples[name, where])
            row[f"p50_ms_at_{token}"] = float(np.median(times))
            row[f"p99_ms_at_{token}"] = float(np.percentile(times, 99))
        state = row.get("state_bytes", row.get(f"state_bytes_at_{args.late}"))
        print(
            f"{name:32s} {row['file_bytes']:9d} B file, {state:9d} B state at token "
            f"{args.late}; p50/p99 at token {START}: {row[f'p50_ms_at_{START}']:.3f}/"
            f"{row[f'p99_ms_at_{START}']:.3f} ms, at token {args.late}: "
            f"{row[f'p50_ms_at_{args.late}']:.3f}/{row[f'p99_ms_at_{args.late}']:.3f} ms"
        )
    served.clear()  # the runtimes let go of their files before the next ones are written
    for kind, model in models.items():
        for count in args.streams:
            step = export(model, f"{kind}_streams{count}", "litert", holder.name, batch=count)[1]
            served[kind, count] = (step, zeros(step))
    samples = common.step_latencies(served, args.width, args.rounds, args.window)
    throughput = {kind: {} for kind in models}
    for (kind, count), seconds in samples.items():
        throughput[kind][count] = count / statistics.median(seconds)
    for kind, row in throughput.items():
        rates = ", ".join(f"{count} streams {rate:,.0f}" for count, rate in row.items())
        print(f"{kind} LiteRT float32, tokens per second: {rates}")
    record = {
        "protocol": vars(args) | {"errors": errors},
        "machine": common.machine(),
        "results": results,
        "throughput_tokens_per_s": throughput,
    }
    print(f"wrote {common.write_json(record, args.output_dir, 'edge.json')}")
    holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
