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

Beside them, `transformer_kv`: four post-norm blocks of causal `keras.layers.MultiHeadAttention`
(the AarenBlock's layout; `benchmarks.common.transformer_model`, the model `benchmarks.streaming`
serves) decoding with a KV cache. Its step takes the token and every block's
cached keys and values, and returns the output and the token's own keys and values, which the
caller appends. LiteRT plans its memory for fixed shapes, so a step is exported (float32, with
Keras' `model.export`) for each cache length timed: 15 entries for token 16, `--late - 1` for
token `--late`. Its cost and its cache grow with the tokens seen.

Reported per model and variant: the file size, the state (or cache) in bytes, the p50 and p99
per-token latency at token 16 and at token `--late`, the largest |y| of the stream and its
largest distance from the LiteRT float32 step's y at the same tokens. The latencies are timed
after the stream from the states kept before those tokens, `--rounds` rounds of `--window`
calls, each round starting one (variant, position) further along, so that a slow spell of a
shared machine is spread over all of them (as in `benchmarks.streaming`). Then the throughput of
`--streams` concurrent streams (a batch of that many, one call per token of all of them) in
tokens per second, for the LiteRT float32 steps of Aaren and the LSTM stack.

It refuses to report (exit status 1) unless every float32 step reproduces its Keras model run
over a 32-token sequence at once (the KV-cache step: at token 16 and over 32 tokens stepped in
Keras), and unless every variant's outputs and state stay finite over the whole stream (Aaren's
running sums grow with every token: the soak checks that no precision lets them overflow).
Results go to `<output-dir>/edge.json` and `edge.png`.
"""

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

from benchmarks.common import (
    kv_cache_step_function,
    machine,
    pyplot,
    refuse_if_wrong,
    require_backend,
    sequence_model,
    serve,
    step_latencies,
    to_host,
    transformer_step_model,
    write_json,
)
from keras_aaren.streaming import export_onnx, export_tflite
from keras_aaren.streaming.export import ONNX_QUANTIZATIONS, TFLITE_QUANTIZATIONS

# The token (counted from 1) whose latency stands for the start of the stream.
START = 16
# (runtime, quantization) of every exported step; the first is the reference of the others.
VARIANTS = tuple(("litert", q) for q in TFLITE_QUANTIZATIONS) + tuple(
    ("onnxruntime", q) for q in ONNX_QUANTIZATIONS
)
KINDS = ("aaren", "lstm", "transformer_kv")
# Concurrent streams whose throughput is measured.
STREAMS = (1, 64, 1024)
QUICK = {
    "tokens": 200,
    "late": 128,
    "width": 16,
    "heads": 2,
    "depth": 2,
    "window": 4,
    "rounds": 1,
    "calibration": 2,
    "streams": [1, 4],
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


def transformer_errors(model, check, folder, cache_length):
    """How far the KV-cache steps are from the causal model over `check` `(1, T, width)`: in
    Keras over every token, and from the exported LiteRT and ONNX files (caches of
    `cache_length`) at token `cache_length + 1`, caches from the Keras steps."""
    expected = to_host(model(check))[0]
    step = kv_cache_step_function(model)
    stepped = serve(step, step.initial_states(), check[0][:, None], keep_at={cache_length})
    errors = {"transformer_kv/keras_steps": float(np.abs(stepped.outputs[:, 0] - expected).max())}
    caches = {n: to_host(c) for n, c in stepped.kept[cache_length].items()}
    for runtime in ("litert", "onnxruntime"):
        _, runner = export_transformer(model, runtime, folder, cache_length)
        y, _ = runner(check[0, cache_length][None], caches)
        name = f"transformer_kv/{variant_name(runtime, None)}"
        errors[name] = float(np.abs(y[0] - expected[cache_length]).max())
    return errors


def export_transformer(model, runtime, folder, cache_length):
    """The KV-cache step with caches of `cache_length` entries, exported by `model.export`."""
    import tensorflow as tf

    step = transformer_step_model(model, cache_length)
    signature = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in step.inputs]
    extension = "tflite" if runtime == "litert" else "onnx"
    path = os.path.join(folder, f"transformer_kv_{runtime}_{cache_length}.{extension}")
    export_format = "litert" if runtime == "litert" else "onnx"
    step.export(path, format=export_format, input_signature=[signature], verbose=False)
    return path, (LiteRTStep if runtime == "litert" else OnnxStep)(path)


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


def throughputs(models, streams, folder, width, rounds, calls):
    """Tokens per second of each model's LiteRT float32 step serving `streams` concurrent
    streams (a batch of that many): `{kind: {streams: tokens per second}}`, from the median
    seconds per call timed in turns."""
    served = {}
    for kind, model in models.items():
        for count in streams:
            path = os.path.join(folder, f"{kind}_streams{count}.tflite")
            step = LiteRTStep(export_tflite(model, path, count))
            served[kind, count] = (step, zero_states(step))
    samples = step_latencies(served, width, rounds, calls, seed=3)
    return {
        kind: {count: count / statistics.median(samples[kind, count]) for count in streams}
        for kind in models
    }


def plot(results, throughput, late, path):
    """p50 latency per token at token 16 and at `late` per variant, and the throughput of
    concurrent streams."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2))
    names = list(results)
    for offset, token in ((-0.2, START), (0.2, late)):
        left.barh(
            [i + offset for i in range(len(names))],
            [results[n][f"p50_ms_at_{token}"] * 1000 for n in names],
            height=0.4,
            label=f"token {token}",
        )
    left.set_yticks(range(len(names)), names, fontsize=7)
    left.invert_yaxis()
    left.set_xscale("log")
    left.set_xlabel("p50 latency per token (µs, one thread, batch 1)")
    left.legend()
    for kind, row in throughput.items():
        counts = sorted(row)
        right.plot(counts, [row[c] for c in counts], marker="o", label=f"{kind}, LiteRT float32")
    right.set_xscale("log")
    right.set_yscale("log")
    counts = sorted({c for row in throughput.values() for c in row})
    right.set_xticks(counts, [str(c) for c in counts])
    right.minorticks_off()
    right.set_xlabel("concurrent streams (batch)")
    right.set_ylabel("tokens per second (one thread)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument("--streams", type=int, nargs="+", default=list(STREAMS))
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
    if min(args.streams) < 1:
        parser.error(f"--streams must be at least 1. Received: {args.streams}")
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

    results, served, errors, infinite, models = {}, {}, {}, [], {}
    # The runtimes map their files: the folder lives until the timing is done.
    holder = tempfile.TemporaryDirectory()
    folder = holder.name
    for kind in (k for k in args.kinds if k != "transformer_kv"):
        model = models[kind] = sequence_model(kind, args.width, args.heads, args.depth)
        expected = to_host(model(check))[0]
        reference = None
        for runtime, quantization in VARIANTS:
            name = f"{kind}/{variant_name(runtime, quantization)}"
            path, step = export(model, kind, runtime, quantization, folder, calibration)
            if quantization is None:
                replayed = serve(step, zero_states(step), check[0][:, None]).outputs[:, 0]
                errors[name] = float(np.abs(replayed - expected).max())
            run = serve(step, zero_states(step), xs, set(positions.values()))
            outputs = run.outputs[:, 0]
            if reference is None:
                reference = outputs
            finite = np.isfinite(outputs).all()
            if not (finite and all(np.isfinite(s).all() for s in run.states.values())):
                infinite.append(name)
            for where, t in positions.items():
                served[name, where] = (step, run.kept[t])
            state_bytes = sum(4 * int(np.prod(s)) for s in step.shapes.values())
            results[name] = {
                "file_bytes": os.path.getsize(path),
                **{f"state_bytes_at_{t + 1}": state_bytes for t in positions.values()},
                "max_abs_y": float(np.abs(outputs).max()),
                "max_abs_y_minus_float32": float(np.abs(outputs - reference).max()),
            }
            print(f"{name}: exported and streamed {args.tokens} tokens", flush=True)
    if "transformer_kv" in args.kinds:
        model = sequence_model("transformer_kv", args.width, args.heads, args.depth)
        errors.update(transformer_errors(model, check, folder, START - 1))
        for runtime in ("litert", "onnxruntime"):
            name = f"transformer_kv/{variant_name(runtime, None)}"
            results[name] = {}
            for where, t in positions.items():
                # The token at position t attends to t cached entries and its own.
                path, step = export_transformer(model, runtime, folder, t)
                caches = {
                    n: rng.normal(size=shape).astype("float32") for n, shape in step.shapes.items()
                }
                served[name, where] = (step, caches)
                results[name]["file_bytes"] = os.path.getsize(path)
                results[name][f"state_bytes_at_{t + 1}"] = sum(c.nbytes for c in caches.values())
            print(f"{name}: exported with caches of {sorted(positions.values())} entries")
    if refuse_if_wrong(errors, "its Keras model over the whole sequence"):
        return 1
    for name in infinite:
        print(f"{name} left the finite range within {args.tokens} tokens: not reporting.")
    if infinite:
        return 1

    samples = step_latencies(served, args.width, args.rounds, args.window)
    for name, row in results.items():
        for where, token in (("start", START), ("late", args.late)):
            times = samples[name, where]
            row[f"p50_ms_at_{token}"] = 1000 * statistics.median(times)
            row[f"p99_ms_at_{token}"] = 1000 * float(np.percentile(times, 99))
        print(
            f"{name:28s} {row['file_bytes']:9d} B file, "
            f"{row[f'state_bytes_at_{args.late}']:9d} B state at token {args.late}; "
            f"p50/p99 at token {START}: {row[f'p50_ms_at_{START}']:.3f}/"
            f"{row[f'p99_ms_at_{START}']:.3f} ms, at token {args.late}: "
            f"{row[f'p50_ms_at_{args.late}']:.3f}/{row[f'p99_ms_at_{args.late}']:.3f} ms",
            flush=True,
        )
    served.clear()  # the runtimes let go of their files before the next ones are written
    throughput = throughputs(
        models, sorted(args.streams), folder, args.width, args.rounds, args.window
    )
    for kind, row in throughput.items():
        rates = ", ".join(f"{count} streams {rate:,.0f}" for count, rate in row.items())
        print(f"{kind} LiteRT float32, tokens per second: {rates}")
    record = {
        "protocol": vars(args) | {"float32_max_error": max(errors.values()), "errors": errors},
        "machine": machine(),
        "results": results,
        "throughput_tokens_per_s": throughput,
    }
    path = write_json(record, args.output_dir, "edge.json", indent=1)
    plot(results, throughput, args.late, os.path.join(args.output_dir, "edge.png"))
    print(f"wrote {path} and edge.png")
    holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
