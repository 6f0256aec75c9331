"""The benchmark modules run end to end on tiny sizes and write their records, and each refuses to
report a result that misses its oracle (a smoke test; no timing is asserted)."""

import json

import keras
import numpy as np
import pytest

from benchmarks import common, edge, layers, memory, scan, streaming
from keras_aaren.ops import aaren_attention_naive
from keras_aaren.streaming import make_step_function

BACKEND = keras.backend.backend()
tensorflow_and_jax = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"), reason="measures TensorFlow and JAX"
)
tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="measures TensorFlow only")

TINY_LAYER = ["--lengths", "8", "--repeats", "1", "--batch", "2", "--heads", "2", "--key-dim", "4"]
DEFAULTS = {"aaren", "aaren_associative", "tfp_style", "mha_causal", "rnn_cell", "lstm"}
# Aaren's projections around no prefix at all, declared to compute Aaren's attention.
WRONG = common.Contender(lambda h, k: common.ProjectedPrefix(h, k, common.no_prefix), exact=True)


def test_layers_benchmark_times_its_default_contenders(tmp_path):
    assert layers.main([*TINY_LAYER, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "layers.json").read_text())
    assert set(record["median_ms"]) == DEFAULTS
    # One round of turns: one sample per contender, and the median is that sample.
    for name, row in record["samples_ms"].items():
        assert row["8"] == [record["median_ms"][name]["8"]]
    errors = record["protocol"]["oracle_errors"]
    assert set(errors) == {"aaren", "aaren_associative", "tfp_style", "rnn_cell"}
    assert max(errors.values()) < common.ORACLE_TOLERANCE
    assert (tmp_path / "layers.png").stat().st_size > 0


@pytest.mark.parametrize(
    "jit_compile",
    [
        False,
        # torch.compile takes minutes per step on a small CPU: the suite runs XLA's path only.
        pytest.param(True, marks=tensorflow_only),
    ],
    ids=["default", "jit-compile"],
)
def test_layers_benchmark_sets_aaren_beside_its_projections(tmp_path, capsys, jit_compile):
    argv = [*TINY_LAYER, "--only", "aaren", "projections_only", "--output-dir", str(tmp_path)]
    assert layers.main(argv + ["--jit-compile"] * jit_compile) == 0
    record = json.loads((tmp_path / "layers.json").read_text())
    assert set(record["median_ms"]) == {"aaren", "projections_only"}
    assert record["protocol"]["compile"] == common.compile_mode(jit_compile)
    assert "aaren / projections_only: " in capsys.readouterr().out


def test_layers_benchmark_refuses_a_contender_that_misses_the_oracle(tmp_path, capsys):
    contenders = common.CONTENDERS | {"wrong": WRONG}
    argv = [*TINY_LAYER, "--only", "aaren", "wrong", "--output-dir", str(tmp_path)]
    assert layers.main(argv, contenders) == 1
    assert "wrong does not match the oracle" in capsys.readouterr().out
    assert not (tmp_path / "layers.json").exists()


def test_tfp_style_prefix_matches_the_oracle():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 37, 3)) * 4.0
    values = rng.normal(size=(2, 37, 3, 5))
    expected, _ = aaren_attention_naive(scores, values)
    got = common.tfp_style_prefix(scores.astype("float32"), values.astype("float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, atol=1e-5)


@tensorflow_and_jax
def test_scan_benchmark_times_the_scan_beside_a_cumsum(tmp_path):
    argv = ["--lengths", "12", "--repeats", "1", "--segment-length", "5"]
    assert scan.main([*argv, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "scan.json").read_text())
    callers = {"tensorflow": ["tf.function", "tf.function(jit_compile=True)"]}
    callers["jax"] = ["eager", "jax.jit"]
    assert [row["caller"] for row in record["results"]] == callers[BACKEND]
    assert record["protocol"]["oracle_max_error"] < common.ORACLE_TOLERANCE
    for row in record["results"]:
        assert row["ratio"] == row["scan_ms"] / row["cumsum_ms"] > 0
        assert row["packed_ratio"] == row["packed_ms"] / row["scan_ms"] > 0


@tensorflow_and_jax
def test_scan_benchmark_refuses_a_scan_that_misses_the_oracle(tmp_path, capsys):
    def plain_cumsum(scores, values):
        # Sums instead of softmax-weighted means.
        return keras.ops.cumsum(values, axis=1), None

    argv = ["--lengths", "8", "--repeats", "1", "--output-dir", str(tmp_path)]
    assert scan.main(argv, scan=plain_cumsum) == 1
    assert "does not match the oracle" in capsys.readouterr().out
    assert not (tmp_path / "scan.json").exists()


TINY_MEMORY = ["--lengths", "8", "--batch", "2", "--only", "aaren"]


@tensorflow_and_jax
def test_memory_benchmark_measures_each_step_in_fresh_processes(tmp_path):
    assert memory.main([*TINY_MEMORY, "--processes", "2", "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "memory.json").read_text())
    assert record["protocol"]["oracle_errors"]["aaren"] < common.ORACLE_TOLERANCE
    row = record["results"]["aaren"]["8"]
    assert len(row["children"]) == 2
    assert 0 <= row["least"] <= row["peak"] <= row["most"]
    if BACKEND == "tensorflow":
        assert row["memory"] == "allocator" and row["planned"] is None
    else:
        # XLA's buffer plan holds at least the input's (2, 8, 64) float32 gradient.
        assert row["memory"] == "resident" and row["planned"] >= 2 * 8 * 64 * 4
    assert (tmp_path / "memory.png").stat().st_size > 0


@tensorflow_and_jax
def test_memory_benchmark_refuses_a_contender_that_misses_the_oracle(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(common.CONTENDERS, "aaren", WRONG)
    assert memory.main([*TINY_MEMORY, "--output-dir", str(tmp_path)]) == 1
    assert "aaren does not match the oracle" in capsys.readouterr().out
    assert not (tmp_path / "memory.json").exists()


TINY_STREAM = ["--tokens", "40", "--window", "8", "--width", "8", "--heads", "2", "--depth", "2"]


@tensorflow_only
def test_streaming_benchmark_serves_each_model_one_token_per_call(tmp_path):
    assert streaming.main([*TINY_STREAM, "--output-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "streaming.json").read_text())
    assert max(record["protocol"]["stepping_errors"].values()) < common.ORACLE_TOLERANCE
    results = record["results"]
    assert set(results) == set(streaming.KINDS)
    # The KV cache grows with the stream: two blocks of keys and values of width 8 per token.
    assert results["transformer_kv"]["state_bytes"] == [2 * 2 * 8 * 4 * t for t in range(1, 41)]
    assert len(set(results["aaren"]["state_bytes"])) == 1
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

    assert streaming.main([*TINY_STREAM, "--output-dir", str(tmp_path)], off_by_one) == 1
    out = capsys.readouterr().out
    assert "aaren does not match" in out and "lstm does not match" in out
    assert "transformer_kv" not in out
    assert not (tmp_path / "streaming.json").exists()


@tensorflow_only
def test_edge_benchmark_serves_every_exported_variant(tmp_path):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("onnxruntime")
    argv = ["--quick", "--kinds", "aaren", "transformer_kv", "--output-dir", str(tmp_path)]
    assert edge.main(argv) == 0
    record = json.loads((tmp_path / "edge.json").read_text())
    results, protocol = record["results"], record["protocol"]
    names = {f"aaren/{runtime}_{q or 'float32'}" for runtime, q in edge.VARIANTS}
    kv = {"transformer_kv/litert_float32", "transformer_kv/onnxruntime_float32"}
    assert set(results) == names | kv
    float32 = {"aaren/litert_float32", "aaren/onnxruntime_float32", "transformer_kv/keras_steps"}
    assert set(protocol["errors"]) == float32 | kv
    assert max(protocol["errors"].values()) < common.ORACLE_TOLERANCE
    for name, row in results.items():
        assert row["file_bytes"] > 0
        for token in (edge.START, protocol["late"]):
            assert 0 < row[f"p50_ms_at_{token}"] <= row[f"p99_ms_at_{token}"]
        if name in kv:
            # A KV cache holds two vectors of the width per block for every token seen.
            cached = 2 * protocol["depth"] * (protocol["late"] - 1) * protocol["width"]
            assert row[f"state_bytes_at_{protocol['late']}"] == 4 * cached
        else:
            # Every runtime and precision carries the same float32 state.
            assert row["state_bytes"] == results["aaren/litert_float32"]["state_bytes"] > 0
            assert np.isfinite(row["max_abs_y"])
    streams = record["throughput_tokens_per_s"]["aaren"]
    assert set(streams) == {"1", "4"} and all(rate > 0 for rate in streams.values())


@tensorflow_only
def test_edge_benchmark_refuses_an_export_that_misses_its_model(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("onnxruntime")
    call = edge.OnnxStep.__call__
    monkeypatch.setattr(edge.OnnxStep, "__call__", lambda self, x, s: (call(self, x, s)[0] + 1, s))
    argv = ["--quick", "--kinds", "transformer_kv", "--output-dir", str(tmp_path)]
    assert edge.main(argv) == 1
    assert "transformer_kv/onnxruntime_float32 does not match" in capsys.readouterr().out
    assert not (tmp_path / "edge.json").exists()


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (layers, ["--repeats", "0"], "--repeats must be at least 1. Received: 0"),
        (layers, ["--max-length", "lstm"], "--max-length takes NAME=T"),
        pytest.param(
            memory,
            ["--cap-gib", "0"],
            "--cap-gib must be positive. Received: 0.0",
            marks=tensorflow_and_jax,
        ),
        pytest.param(
            streaming,
            ["--tokens", "16"],
            "--tokens must be more than 16. Received: 16",
            marks=tensorflow_only,
        ),
    ],
    ids=["layers-repeats-0", "layers-max-length-no-T", "memory-cap-0", "streaming-tokens-16"],
)
def test_benchmark_arguments_are_checked(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
