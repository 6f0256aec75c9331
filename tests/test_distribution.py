"""Data-parallel training on two CPU devices gives the weights of training on one.

Each engine runs `distributed_training.py` in a subprocess: the two devices must be set up before
TensorFlow or JAX starts, and this process has started them already. Each runs in the test run of
its own backend only (CI runs both): it does not depend on the backend of this process, and
running it in both would only repeat it.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_training.py")


def run_script(engine, **env):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    result = subprocess.run(
        [sys.executable, SCRIPT, engine], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check(result):
    assert result["replicas"] == 2
    # Training moved the weights by ~0.1; the two runs agree to float32 rounding.
    assert result["moved"] > 0.01
    assert result["weight_gap"] < 1e-5
    assert result["loss_gap"] < 1e-5


def own_backend(name):
    return pytest.mark.skipif(
        keras.backend.backend() != name, reason=f"runs in the {name} test run"
    )


@own_backend("tensorflow")
def test_mirrored_strategy_matches_one_device():
    check(run_script("mirrored", KERAS_BACKEND="tensorflow"))


@own_backend("jax")
def test_jax_data_parallel_matches_one_device():
    pytest.importorskip("jax")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    check(run_script("data_parallel", KERAS_BACKEND="jax", XLA_FLAGS=flags.strip()))
