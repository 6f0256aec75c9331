"""The examples run end to end in quick mode and produce their outputs (no accuracy thresholds)."""

import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_quick(tmp_path):
    pytest.importorskip("aeon")
    quickstart = load_example("quickstart")
    result = quickstart.main(["--quick", "--output-dir", str(tmp_path)])
    assert os.path.getsize(result["plot"]) > 0
    # The streaming replay runs the same weights: it must agree with the parallel model whatever
    # the accuracy after a few epochs.
    assert result["max_diff"] < 1e-4
    assert 0.0 <= result["accuracy"] <= 1.0


def test_streaming_co2_quick(tmp_path):
    pytest.importorskip("statsmodels")
    example = load_example("streaming_co2")
    result = example.main(["--quick", "--output-dir", str(tmp_path)])
    assert os.path.getsize(result["plot"]) > 0
    # Served token by token with the trained weights: equal to the parallel model (in ppm, on
    # levels near 350, so float32 rounding of the level is ~2e-5).
    assert result["max_diff"] < 1e-3
    assert len(result["state_sizes"]) == 1
