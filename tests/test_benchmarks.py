"""The benchmark modules run end to end on tiny sizes (a smoke test; no timing is asserted)."""

import json

import keras
import pytest

from benchmarks import layers


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="benchmarks measure TF")
def test_layers_benchmark_smoke(tmp_path):
    status = layers.main(
        [
            "--lengths",
            "8",
            "--repeats",
            "1",
            "--batch",
            "2",
            "--heads",
            "2",
            "--key-dim",
            "4",
            "--only",
            "aaren",
            "tfp_style",
            "mha_causal",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert status == 0
    record = json.loads((tmp_path / "layers.json").read_text())
    assert set(record["median_ms"]) == {"aaren", "tfp_style", "mha_causal"}
    assert record["protocol"]["oracle_max_error"] < 1e-4
    assert (tmp_path / "layers.png").stat().st_size > 0
