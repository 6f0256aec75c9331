"""The benchmark modules run end to end on tiny sizes, write their records, and refuse to report
a wrong result (a smoke test; no timing is asserted)."""

import importlib
import json
import os
import sys

import keras
import numpy as np
import pytest

from benchmarks import common, layers, lengths, memory, scan, streaming
from keras_aaren.ops import aaren_attention_naive, full_precision_matmuls
from keras_aaren.streaming import make_step_function

BACKEND = keras.backend.backend()
measured_backend = pytest.mark.skipif(
    BACKEND not in common.BACKENDS,
    reason=f"the benchmarks measure {' and '.join(common.BACKENDS)}",
)
tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="measures TensorFlow only")

TINY_LAYER = ["--lengths", "8", "--repeats", "1", "--batch", "2", "--heads", "2", "--key-dim", "4"]


@measured_backend
def test_layers_benchmark_times_its_default_contenders(tmp_path):
    assert layers.main([*TINY_LAYER, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "layers.json").read_text())
    defaults = {"aaren", "aaren_associative", "tfp_style", "mha_causal", "rnn_cell", "lstm"}
    assert set(record["median_ms"]) == defaults
    # One round of turns: one sample per contender, and the median is that sample.
    for name, row in record["samples_ms"].items():
        assert row["8"] == [record["median_ms"][name]["8"]]
    assert set(record["page_faults_per_step"]) == defaults
    assert "TF_CPU_ALLOCATOR_USE_BFC" in record["machine"]["allocator"]
    # Every contender that computes Aaren's attention was checked against the naive oracle.
    errors = record["protocol"]["oracle_errors"]
    assert set(errors) == {"aaren", "aaren_associative", "tfp_style", "rnn_cell"}
    assert max(errors.values()) == record["protocol"]["oracle_max_error"] < 1e-4
    assert (tmp_path / "layers.png").stat().st_size > 0


@measured_backend
def test_layers_benchmark_runs_its_references_when_named(tmp_path):
    only = ["--only", "aaren", "projections_only", "cumsum_prefix"]
    assert layers.main([*TINY_LAYER, *only, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "layers.json").read_text())
    assert set(record["median_ms"]) == {"aaren", "projections_only", "cumsum_prefix"}
    assert set(record["protocol"]["oracle_errors"]) == {"aaren", "cumsum_prefix"}


@measured_backend
def test_layers_benchmark_refuses_a_contender_that_misses_the_oracle(tmp_path, capsys):
    # Aaren's projections around no prefix at all, declared to compute Aaren's attention.
    wrong = common.Contender(
        lambda h, k: common.ProjectedPrefix(h, k, common.no_prefix), exact=True
    )
    contenders = common.CONTENDERS | {"wrong": wrong}
    only = ["--only", "aaren", "wrong"]
    status = layers.main([*TINY_LAYER, *only, "--output-dir", str(tmp_path)], contenders)
    assert status == 1
    assert "wrong does not match the oracle" in capsys.readouterr().out
    assert not (tmp_path / "layers.json").exists()


@pytest.mark.parametrize(
    "prefix", [common.tfp_style_prefix, common.cumsum_prefix], ids=["tfp_style", "cumsum"]
)
def test_baseline_prefixes_match_the_oracle(prefix):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 37, 3)) * 4.0
    values = rng.normal(size=(2, 37, 3, 5))
    expected, _ = aaren_attention_naive(scores, values)
    got = prefix(*(keras.ops.convert_to_tensor(x.astype("float32")) for x in (scores, values)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, atol=1e-5)


@measured_backend
def test_scan_benchmark_smoke(tmp_path):
    status = scan.main(["--lengths", "8", "--repeats", "1", "--output-dir", str(tmp_path)])
    assert status == 0
    record = json.loads((tmp_path / "scan.json").read_text())
    callers = {
        "tensorflow": ["tf.function", "tf.function(jit_compile=True)"],
        "jax": ["eager", "jax.jit"],
    }[BACKEND]
    assert [row["caller"] for row in record["results"]] == callers
    assert record["protocol"]["oracle_max_error"] < 1e-4
    assert all(row["scan_page_faults"] >= 0 for row in record["results"])
    # The least traffic of (8, 8, 4, 16) float32 values read and written, over the time taken.
    row = record["results"][0]
    assert row["cumsum_gb_per_s"] == pytest.approx(2 * 4 * 8 * 8 * 4 * 16 / row["cumsum_ms"] / 1e6)


@measured_backend
def test_scan_benchmark_with_segments(tmp_path):
    args = ["--lengths", "12", "--repeats", "1", "--segment-length", "5"]
    assert scan.main([*args, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "scan.json").read_text())
    assert record["protocol"]["segment_length"] == 5
    assert record["protocol"]["oracle_max_error"] < 1e-4
    # Packed rows are timed beside the scan without segments, by the same callers.
    assert all(row["packed_ms"] > 0 and row["packed_ratio"] > 0 for row in record["results"])


@measured_backend
def test_scan_benchmark_refuses_a_scan_that_misses_the_oracle(tmp_path, capsys):
    def plain_cumsum(scores, values):
        # Sums instead of softmax-weighted means.
        return keras.ops.cumsum(values, axis=1), None

    args = ["--lengths", "8", "--repeats", "1", "--output-dir", str(tmp_path)]
    assert scan.main(args, scan=plain_cumsum) == 1
    assert "does not match the oracle" in capsys.readouterr().out
    assert not (tmp_path / "scan.json").exists()


@measured_backend
def test_memory_benchmark_smoke(tmp_path):
    args = ["--lengths", "8", "--batch", "2", "--only", "aaren", "--processes", "2"]
    assert memory.main([*args, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "memory.json").read_text())
    assert record["oracle_errors"]["aaren"] == record["oracle_max_error"] < 1e-4
    children = record["children"]["aaren"]["8"]
    assert len(children) == 2
    every = [peak for child in children for peak in child["peaks"]]
    least, most = record["least_peak_bytes"]["aaren"]["8"], record["most_peak_bytes"]["aaren"]["8"]
    assert (least, most) == (min(every), max(every))
    assert 0 <= least <= record["peak_bytes"]["aaren"]["8"] <= most
    if BACKEND == "tensorflow":
        assert record["protocol"]["memory"] == ["allocator"]
        assert record["protocol"]["compilation"] == "tf.function"
        assert len(children[0]["peaks"]) == memory.TF_STEPS
        assert record["resident_peak_bytes"]["aaren"]["8"] >= 0
        assert record["planned_bytes"]["aaren"] == {}
    else:
        assert record["protocol"]["memory"] == ["resident"]
        assert record["protocol"]["compilation"] == "jax.jit"
        # XLA's buffer plan holds at least the input's (2, 8, 64) float32 gradient.
        assert record["planned_bytes"]["aaren"]["8"] >= 2 * 8 * 64 * 4
    assert (tmp_path / "memory.png").stat().st_size > 0


@tensorflow_only
def test_memory_benchmark_smoke_under_xla(tmp_path):
    args = ["--lengths", "8", "--batch", "2", "--only", "aaren", "--processes", "1", "--xla"]
    assert memory.main([*args, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "memory.json").read_text())
    assert record["protocol"]["compilation"] == "XLA"
    assert record["peak_bytes"]["aaren"]["8"] >= 0


@tensorflow_only
def test_memory_benchmark_stops_a_child_past_the_cap(tmp_path):
    # Tracing the step alone grows the child by far more than 1 MiB.
    args = ["--lengths", "8", "--batch", "2", "--only", "aaren", "--cap-gib", str(2**-10)]
    assert memory.main([*args, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "memory.json").read_text())
    assert record["over_cap_bytes"]["aaren"] == {"8": 2**20}
    assert record["peak_bytes"]["aaren"] == {}
    assert (tmp_path / "memory.png").stat().st_size > 0


@pytest.mark.parametrize("module", ["layers", "memory"])
@pytest.mark.skipif(BACKEND != "jax", reason="--xla is refused on JAX only")
def test_benchmarks_refuse_xla_on_jax(module, capsys):
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--xla", "--lengths", "8"])
    assert exit_info.value.code == 2
    assert "Received: --xla with KERAS_BACKEND=jax" in capsys.readouterr().err


def test_growth_per_doubling_pairs_each_length_with_its_double():
    assert memory.growth_per_doubling({1024: 10.0, 2048: 21.0, 4096: 40.0, 3000: 1.0}) == 2.1
    assert memory.growth_per_doubling({1024: 10.0, 4096: 40.0}) is None


def test_a_failed_child_reports_its_exception_not_a_traceback_line():
    # What a child that Keras' traceback filter wraps writes: the exception, then more frames,
    # one of them in Keras' `error_handler`.
    stderr = [
        "Traceback (most recent call last):",
        "ValueError: the step does not compile",
        '  File "traceback_utils.py", line 156, in error_handler',
    ]
    message = "\n".join(stderr)
    script = f"import sys\nprint('start 0', flush=True)\nsys.exit({message!r})"
    outcome, message = memory.run_child([sys.executable, "-c", script], dict(os.environ), 2**30)
    assert (outcome, message) == ("failed", "ValueError: the step does not compile")


@tensorflow_only
def test_tensorflow_peak_counts_freed_temporaries():
    import tensorflow as tf

    @tf.function
    def step(x):
        # A (1024, 1024) float32 temporary, 4 MiB, that is freed before the step returns.
        return tf.reduce_sum(tf.exp(x[:, None] * x[None, :]))

    x = tf.ones((1024,))
    step(x)
    peak = memory.tensorflow_peak(lambda: step(x))
    assert 4 * 2**20 <= peak < 16 * 2**20


TINY_STREAM = ["--tokens", "40", "--window", "8", "--width", "8", "--heads", "2", "--depth", "2"]


@tensorflow_only
def test_streaming_benchmark_smoke(tmp_path):
    assert streaming.main([*TINY_STREAM, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "streaming.json").read_text())
    errors = record["protocol"]["stepping_errors"]
    assert set(errors) == {"aaren", "lstm", "transformer_kv"} and max(errors.values()) < 1e-4
    results = record["results"]
    assert set(results) == {"aaren", "lstm", "transformer_kv"}
    # The KV cache grows with the stream; the recurrent states do not.
    kv = results["transformer_kv"]
    assert kv["state_bytes_end"] > kv["state_bytes_start"]
    assert results["aaren"]["state_bytes_end"] == results["aaren"]["state_bytes_start"]
    assert all(row["p50_start_ms"] > 0 and row["p50_end_ms"] > 0 for row in results.values())
    assert (tmp_path / "streaming.png").stat().st_size > 0


@tensorflow_only
def test_streaming_benchmark_refuses_a_step_that_misses_the_whole_sequence(tmp_path, capsys):
    def off_by_one(model, batch_size, jit_compile=None):
        step = make_step_function(model, batch_size, jit_compile=jit_compile)

        def wrong(x, states):
            y, states = step(x, states)
            return y + 1.0, states

        wrong.initial_states = step.initial_states
        return wrong

    status = streaming.main([*TINY_STREAM, "--output-dir", str(tmp_path)], off_by_one)
    assert status == 1
    out = capsys.readouterr().out
    assert "aaren does not match" in out and "lstm does not match" in out
    assert "transformer_kv" not in out
    assert not (tmp_path / "streaming.json").exists()


def test_step_latencies_time_every_key_in_turns_from_its_kept_states():
    calls = []

    def step(name):
        def run(x, states):
            calls.append((name, x.shape, states))
            return np.zeros_like(x), {"s": states["s"] + 1}

        return run

    served = {"a": (step("a"), {"s": np.zeros((1, 3))}), "b": (step("b"), {"s": np.ones((4, 3))})}
    samples = common.step_latencies(served, width=5, rounds=2, calls=3)
    assert {key: len(times) for key, times in samples.items()} == {"a": 6, "b": 6}
    # Round one starts with "a", round two with "b"; every call is from the kept states, with a
    # batch of the states' first dimension.
    assert [name for name, _, _ in calls] == list("aaabbbbbbaaa")
    for name, shape, states in calls:
        assert states is served[name][1] and shape == ({"a": 1, "b": 4}[name], 5)
    np.testing.assert_array_equal(served["a"][1]["s"], np.zeros((1, 3)))


@measured_backend
def test_kv_cache_step_reproduces_the_causal_model_and_grows_its_cache():
    model = common.sequence_model("transformer_kv", 8, 2, 2)
    step = common.kv_cache_step_function(model)
    x = np.random.default_rng(0).normal(size=(1, 6, 8)).astype("float32")
    run = common.serve(step, step.initial_states(), x.swapaxes(0, 1), {0, 4}, record_memory=True)
    expected = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(run.outputs.swapaxes(0, 1), expected, atol=1e-5)
    # Two blocks of keys and values, 8 float32 numbers per token each.
    assert run.state_bytes.tolist() == [4 * 8 * 4 * t for t in range(1, 7)]
    assert [common.state_bytes(run.kept[t]) for t in (0, 4)] == [0, 4 * 8 * 4 * 4]
    assert (run.resident > 0).all() and (run.latencies > 0).all()


def test_sequence_model_names_the_kind_it_refuses():
    with pytest.raises(ValueError, match="Received: kind='gru'"):
        common.sequence_model("gru", 8, 2, 1)


MAX_LENGTH_MESSAGE = "--max-length takes NAME=T, NAME one of aaren, aaren_associative"


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("layers", ["--repeats", "0"], "--repeats must be at least 1. Received: 0"),
        ("layers", ["--max-length", "mha=8192"], MAX_LENGTH_MESSAGE),
        ("layers", ["--max-length", "mha_causal=8192", "lstm=0"], "Received: 'lstm=0'"),
        ("layers", ["--max-length", "lstm"], "Received: 'lstm'"),
        ("layers", ["--only", "mha"], "argument --only: invalid choice: 'mha'"),
        ("memory", ["--cap-gib", "0"], "--cap-gib must be positive. Received: 0.0"),
        ("memory", ["--processes", "0"], "--processes must be at least 1. Received: 0"),
        ("streaming", ["--window", "0"], "--window must be at least 1. Received: 0"),
        ("streaming", ["--rounds", "0"], "--rounds must be at least 1. Received: 0"),
        ("streaming", ["--tokens", "16"], "--tokens must be more than 16. Received: 16"),
        ("lengths", ["--lengths", "1"], "--lengths must be at least 2. Received: 1"),
        ("lengths", ["--shortest", "0"], "--shortest must be at least 1. Received: 0"),
        ("lengths", ["--bucket", "0"], "--bucket must be at least 1. Received: 0"),
        ("lengths", ["--lengths", "3", "--warmup", "3"], "Received: --warmup 3 with --lengths 3"),
    ],
    ids=[
        "layers-repeats-0",
        "layers-max-length-unknown-name",
        "layers-max-length-zero",
        "layers-max-length-no-T",
        "layers-only-unknown",
        "memory-cap-0",
        "memory-processes-0",
        "streaming-window-0",
        "streaming-rounds-0",
        "streaming-tokens-16",
        "lengths-lengths-1",
        "lengths-shortest-0",
        "lengths-bucket-0",
        "lengths-warmup-all",
    ],
)
def test_benchmark_arguments_are_checked(module, args, message, capsys):
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@tensorflow_only
def test_edge_benchmark_smoke(tmp_path):
    edge = importlib.import_module("benchmarks.edge")
    argv = ["--quick", "--kinds", "aaren", "transformer_kv", "--output-dir", str(tmp_path)]
    assert edge.main(argv) == 0
    record = json.loads((tmp_path / "edge.json").read_text())
    results = record["results"]
    names = {f"aaren/{edge.variant_name(*variant)}" for variant in edge.VARIANTS}
    kv = {"transformer_kv/litert_float32", "transformer_kv/onnxruntime_float32"}
    assert set(results) == names | kv
    # The float32 steps reproduced the Keras model over a whole sequence (the KV-cache steps
    # also stepped in Keras).
    float32 = {"aaren/litert_float32", "aaren/onnxruntime_float32", "transformer_kv/keras_steps"}
    assert set(record["protocol"]["errors"]) == float32 | kv
    assert record["protocol"]["float32_max_error"] < 1e-4
    late = record["protocol"]["late"]
    aaren_state = results["aaren/litert_float32"][f"state_bytes_at_{late}"]
    for name, row in results.items():
        assert row["file_bytes"] > 0
        for token in (edge.START, late):
            assert 0 < row[f"p50_ms_at_{token}"] <= row[f"p99_ms_at_{token}"]
        if name in kv:
            # A KV cache holds every token seen: two vectors of the width per block each.
            for token in (edge.START, late):
                protocol = record["protocol"]
                cached = 2 * protocol["depth"] * (token - 1) * protocol["width"]
                assert row[f"state_bytes_at_{token}"] == 4 * cached
        else:
            # Every runtime and precision carries the same float32 state, whatever the token.
            assert np.isfinite(row["max_abs_y"])
            for token in (edge.START, late):
                assert row[f"state_bytes_at_{token}"] == aaren_state > 0
    streams = record["throughput_tokens_per_s"]["aaren"]
    assert set(streams) == {"1", "4"} and all(rate > 0 for rate in streams.values())
    assert (tmp_path / "edge.png").stat().st_size > 0


LENGTH_FIGURES = {
    "resident_mib_after_warmup",
    "resident_mib_end",
    "growth_mib_after_warmup",
    "median_ms_per_new_length",
}


@measured_backend
def test_lengths_benchmark_smoke(tmp_path):
    # One scenario: every contender's child process imports the backend afresh, which is most
    # of the time this takes.
    argv = ["--lengths", "3", "--scenarios", "predict", "--output-dir", str(tmp_path)]
    assert lengths.main(argv) == 0
    record = json.loads((tmp_path / "lengths.json").read_text())
    protocol = record["protocol"]
    # Fewer than 200 lengths: the growth is measured after the first half of them.
    assert protocol["warmup"] == 1 and sorted(protocol["order"]) == [10, 11, 12]
    assert max(protocol["stepping_errors"].values()) <= 1e-5
    assert set(record["results"]) == {"predict"}
    assert set(record["results"]["predict"]) == {"aaren", "lstm"}
    for contender, row in record["results"]["predict"].items():
        assert set(row) == LENGTH_FIGURES and row["median_ms_per_new_length"] > 0
        calls = record["calls"]["predict"][contender]
        assert len(calls["seconds"]) == len(calls["resident_bytes"]) == 3
    targets = record["targets"]
    assert set(targets) == {"predict_growth_minus_lstm_mib", "predict_time_over_lstm"}
    assert (
        targets["predict_growth_minus_lstm_mib"]["limit"] == {"tensorflow": 50, "jax": 0}[BACKEND]
    )
    assert (tmp_path / "lengths.png").stat().st_size > 0


@measured_backend
def test_lengths_benchmark_pads_to_the_bucket_and_cuts_back_in_the_bucketed_scenario():
    model, _ = lengths.build("aaren")
    x = np.random.default_rng(0).normal(size=(1, 13, lengths.WIDTH)).astype("float32")
    with full_precision_matmuls():
        alone = model.predict(x, verbose=0)
        bucketed = lengths.predict_in_bucket(model, x, bucket=8)
    # 13 steps padded to 16: the causal layer gives the real steps what it gives them alone.
    assert bucketed.shape == alone.shape == (1, 13, lengths.WIDTH)
    np.testing.assert_allclose(bucketed, alone, atol=1e-6)
    record = lengths.measure("bucketed", "lstm", [12, 10, 11], seed=0, bucket=8)
    assert len(record["seconds"]) == len(record["resident_bytes"]) == 3


@measured_backend
def test_lengths_benchmark_calls_the_layer_directly_in_the_eager_scenario():
    record = lengths.measure("eager", "aaren", [12, 10, 11], seed=0)
    assert len(record["seconds"]) == len(record["resident_bytes"]) == 3
    row = lengths.summarise(record, warmup=1)
    assert set(row) == LENGTH_FIGURES and row["median_ms_per_new_length"] > 0


def test_lengths_targets_compare_aaren_with_the_lstm_of_the_same_run():
    def row(growth, ms):
        return {"growth_mib_after_warmup": growth, "median_ms_per_new_length": ms}

    results = {
        "predict": {"aaren": row(30.0, 3.0), "lstm": row(10.0, 2.5)},
        "eager": {"aaren": row(150.0, 1.0), "lstm": row(10.0, 1.0)},
        "bucketed": {"aaren": row(900.0, 9.0), "lstm": row(1.0, 1.0)},
    }
    found = lengths.targets(results, "tensorflow")
    assert found["predict_growth_minus_lstm_mib"] == {"value": 20.0, "limit": 50.0, "met": True}
    assert found["predict_time_over_lstm"] == {"value": 1.2, "limit": 1.5, "met": True}
    assert found["eager_growth_minus_lstm_mib"] == {"value": 140.0, "limit": 100.0, "met": False}
    # The bucketed scenario shows the padding recipe; it has no target of its own.
    assert not any(name.startswith("bucketed") for name in found)
    # On JAX Aaren's predict may grow no more than the LSTM's.
    assert not lengths.targets(results, "jax")["predict_growth_minus_lstm_mib"]["met"]


@measured_backend
def test_lengths_benchmark_refuses_an_aaren_off_its_stepped_cell(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lengths, "stepping_errors", lambda seed, bucket: {"aaren/predict": 1e-3})
    assert lengths.main(["--lengths", "3", "--output-dir", str(tmp_path)]) == 1
    assert "aaren/predict does not match keras.layers.RNN" in capsys.readouterr().out
    assert not (tmp_path / "lengths.json").exists()


def test_context_parallel_benchmark_reads_collectives_from_hlo():
    from benchmarks import context_parallel

    text = (
        "  %all-gather.1 = f32[4,8,2,18]{3,2,1,0} all-gather(%x), dimensions={0}\n"
        "  %cp = (f32[1,8,2]{2,1,0}, f32[1,8,2]{2,1,0}, u32[]) collective-permute-start(%y)\n"
        "  %ar = (f32[16,5]{1,0}, s32[3]{0}) all-reduce(%z, %w), to_apply=%add\n"
        "  %dot = f32[4,8]{1,0} dot(%all-gather.1, %b)\n"
    )
    assert context_parallel.collectives(text) == [
        ("all-gather", "f32[4,8,2,18]", 4 * 8 * 2 * 18 * 4),
        ("all-reduce", "f32[16,5]", 16 * 5 * 4),
        ("all-reduce", "s32[3]", 3 * 4),
        ("collective-permute", "f32[1,8,2]", 8 * 2 * 4),
    ]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX only")
def test_context_parallel_benchmark_measures_memory_and_exchange(tmp_path):
    from benchmarks import context_parallel

    tiny = ["--devices", "1", "2", "--lengths", "32", "64", "--what", "scan"]
    sizes = ["--batch", "2", "--heads", "2", "--value-dim", "4"]
    assert context_parallel.main([*tiny, *sizes, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "context_parallel.json").read_text())
    assert record["protocol"]["oracle_max_error"] < common.ORACLE_TOLERANCE
    rows = {(r["N"], r["T"]): r for r in record["results"]}
    assert set(rows) == {(1, 32), (2, 32), (1, 64), (2, 64)}
    assert rows[1, 64]["collective_bytes"] == 0
    # Split in two, the scan exchanges the same few bytes at both lengths ...
    assert 0 < rows[2, 32]["collective_bytes"] == rows[2, 64]["collective_bytes"] < 4096
    # ... and each device plans for less memory than one device alone.
    assert rows[2, 64]["peak_bytes"] < rows[1, 64]["peak_bytes"]


@measured_backend
def test_packing_benchmark_smoke(tmp_path):
    pytest.importorskip("aeon")
    packing = importlib.import_module("benchmarks.packing")
    assert packing.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "packing.json").read_text())
    # The packed model, given the padded model's weights, predicted every test series alike.
    assert record["protocol"]["equivalence_error"] <= packing.TOLERANCE
    padded, packed = record["results"]["padded"], record["results"]["packed"]
    # The same series, so the same real tokens; packed rows hold them in fewer computed tokens.
    assert (
        padded["real_tokens"] == packed["real_tokens"] == sum(record["protocol"]["train_lengths"])
    )
    assert packed["tokens"] < padded["tokens"]
    assert padded["steps_per_epoch"] == packed["steps_per_epoch"]
    for row in (padded, packed):
        assert row["seconds_per_epoch"] > 0 and 0 <= row["test_accuracy_mean"] <= 1
    assert len(record["runs"]["packed"][0]["epoch_seconds"]) == packing.QUICK["epochs"]
    assert set(record["equal_rows_step_ms"]) == set(packing.MODES)
    assert set(record["targets"]) == {"packed_over_padded_epoch_time", "accuracy_difference"}
    assert (tmp_path / "packing.png").stat().st_size > 0
