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


def test_baselines_ignore_padding():
    # Padding a sequence at the end must not change any model's summary of it: the Transformer's
    # padding mask, the Aaren and LSTM masks, and the masked mean all have to hold.
    import keras
    import numpy as np

    import baselines

    rng = np.random.default_rng(0)
    sequences = [rng.normal(size=(n, 3)).astype("float32") for n in (5, 9)]
    padded = baselines.pad(sequences)
    assert padded.shape == (2, 9, 3) and (padded[0, 5:] == baselines.PAD).all()
    for kind in baselines.MODELS:
        inputs = keras.Input((None, 3))
        model = keras.Model(inputs, baselines.encoder(inputs, kind, depth=2))
        alone = model.predict(sequences[0][None], verbose=0)[0]
        batched = model.predict(padded, verbose=0)[0]
        np.testing.assert_allclose(batched, alone, atol=1e-5, err_msg=kind)


def test_uea_classification_quick(tmp_path):
    pytest.importorskip("aeon")
    example = load_example("uea_classification")
    result = example.main(["--quick", "--output-dir", str(tmp_path)])
    assert {row["model"] for row in result["results"]} == {"aaren", "transformer", "lstm"}
    assert all(0.0 <= row["accuracies"][0] <= 1.0 for row in result["results"])
    assert os.path.getsize(result["plot"]) > 0
    assert "| JapaneseVowels | aaren |" in open(result["table"]).read()


def test_uea_classification_pads_variable_lengths():
    pytest.importorskip("aeon")
    import numpy as np
    from aeon.datasets import load_classification

    import baselines

    example = load_example("uea_classification")
    data, classes = example.load("JapaneseVowels")
    raw, _ = load_classification("JapaneseVowels", split="train")
    x, y = data["train"]
    # Every case keeps all of its timesteps (no truncation), followed by padding only.
    real = (x != baselines.PAD).all(axis=-1)
    np.testing.assert_array_equal(real.sum(axis=1), [case.shape[1] for case in raw])
    assert x.shape == (len(raw), max(case.shape[1] for case in raw), 12)
    assert sorted(set(y)) == list(range(len(classes))) == list(range(9))


def test_packed_classification_quick(tmp_path):
    pytest.importorskip("aeon")
    example = load_example("packed_classification")
    result = example.main(["--quick", "--output-dir", str(tmp_path)])
    # Given the padded model's weights, the packed model predicts every test series alike.
    assert result["max_diff"] < 1e-4
    padded, packed = result["results"]
    assert (padded["mode"], packed["mode"]) == ("padded", "packed")
    # The same series, so the same real tokens, which packed rows hold in fewer computed ones.
    assert padded["real_tokens"] == packed["real_tokens"] < packed["tokens"] < padded["tokens"]
    assert all(0 <= run["accuracy"] <= 1 for row in result["results"] for run in row["runs"])
    assert os.path.getsize(result["plot"]) > 0
    assert "| packed |" in open(result["table"]).read()


def test_forecasting_quick(tmp_path):
    pytest.importorskip("statsmodels")
    example = load_example("forecasting")
    result = example.main(["--quick", "--output-dir", str(tmp_path)])
    models = [row["model"] for row in result["results"]]
    assert models == ["seasonal naive", "aaren", "transformer", "lstm"]
    assert all(len(row["mse"][0]) == 11 for row in result["results"])
    assert os.path.getsize(result["plot"]) > 0


def test_forecasting_windows_and_seasonal_naive():
    pytest.importorskip("statsmodels")
    import numpy as np

    example = load_example("forecasting")
    series = np.arange(40, dtype="float32") ** 2
    inputs, targets = example.make_windows(series, 4, 3, [10, 20], scale=2.0)
    # Relative to the last observed value (index 9 for origin 10), divided by the scale.
    np.testing.assert_allclose(inputs[0, :, 0], (series[6:10] - series[9]) / 2)
    np.testing.assert_allclose(targets[1], (series[20:23] - series[19]) / 2)
    naive = example.seasonal_naive(series, [20], horizon=7, season=3, scale=1.0)
    # Step h (0-based) of a forecast from origin 20 repeats the value one season earlier, or two
    # seasons earlier once the first season is past: 20+h-3 for h<3, 20+h-6 for 3<=h<6, ...
    expected = [series[20 + h - 3 * (h // 3 + 1)] - series[19] for h in range(7)]
    np.testing.assert_allclose(naive[0], expected)


def test_event_forecasting_quick(tmp_path):
    example = load_example("event_forecasting")
    result = example.main(["--quick", "--output-dir", str(tmp_path)])
    rows = {row["model"]: row for row in result["results"]}
    assert set(rows) == {"true process", "aaren", "transformer", "lstm"}
    import numpy as np

    assert all(np.isfinite(row["log_likelihood"]).all() for row in rows.values())
    assert os.path.getsize(result["plot"]) > 0


def test_hawkes_simulation_rate_and_density():
    import numpy as np
    from scipy import integrate

    example = load_example("event_forecasting")
    rng = np.random.default_rng(0)
    sequences = [example.simulate_hawkes(rng) for _ in range(200)]
    # A stationary Hawkes process has mean rates (I - alpha)^-1 mu; the start from an empty
    # history lowers the count a little, hence the loose bound.
    rates = np.linalg.solve(np.eye(3) - example.ALPHA, example.MU)
    counts = np.array([np.bincount(types, minlength=3) for _, types in sequences]).mean(0)
    np.testing.assert_allclose(counts / example.DURATION, rates, rtol=0.1)

    # The true conditional density of the next event, summed over types and integrated over its
    # time, is one.
    times, types = sequences[0]
    history_t, history_k = times[:5], types[:5]

    def density(gap, kind):
        t = np.append(history_t, history_t[-1] + gap)
        k = np.append(history_k, kind)
        time_part, type_part = example.true_log_likelihood(t, k)
        return np.exp(time_part[-1] + type_part[-1])

    total = sum(integrate.quad(density, 0, np.inf, args=(kind,))[0] for kind in range(3))
    assert abs(total - 1) < 1e-6


def test_event_forecasting_model_density_normalizes():
    import keras
    import numpy as np
    from scipy import integrate

    example = load_example("event_forecasting")
    rng = np.random.default_rng(0)
    y_pred = rng.normal(size=(1, 1, 3 * example.COMPONENTS + example.NUM_TYPES))

    def density(gap, kind):
        y = np.array([[[gap, kind]]])
        time_part, type_part = example.log_likelihood(y, y_pred, example.numpy_ops)
        return np.exp(time_part + type_part)[0, 0]

    total = sum(integrate.quad(density, 0, np.inf, args=(kind,), limit=200)[0] for kind in range(3))
    assert abs(total - 1) < 1e-5
    # The Keras-ops loss computes the same numbers as the NumPy evaluation.
    y = np.array([[[0.7, 2.0]]])
    expected = -sum(example.log_likelihood(y, y_pred, example.numpy_ops))
    got = keras.ops.convert_to_numpy(
        example.negative_log_likelihood(y.astype("float32"), y_pred.astype("float32"))
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The predicted mean gap is the mean of that density.
    mean = integrate.quad(lambda g: g * sum(density(g, k) for k in range(3)), 0, np.inf, limit=200)
    np.testing.assert_allclose(example.predicted_mean_gap(y_pred)[0, 0], mean[0], rtol=1e-4)


def test_encoder_rejects_unknown_readout():
    baselines = load_example("baselines")
    with pytest.raises(ValueError, match="`readout` must be 'last' or 'mean'. Received: readout="):
        baselines.encoder(baselines.keras.Input((None, 3)), "aaren", readout="first")


def test_decision_transformer_quick(tmp_path):
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    import numpy as np

    example = load_example("decision_transformer")
    cache = str(tmp_path / "cache")
    result = example.main(["--quick", "--output-dir", str(tmp_path), "--cache-dir", cache])
    # The streamed Aaren DTs act with the parallel models' actions on every recorded episode,
    # whatever they learned in one epoch.
    assert result["max_diff"] < 1e-4
    acting = {(row["model"], row["mode"]) for row in result["results"]}
    assert acting == {
        ("behaviour policy", "dataset"),
        ("transformer DT", "window"),
        ("aaren DT", "window"),
        ("aaren DT", "stream"),
        ("aaren DT, whole episodes", "stream"),
    }
    # Same width and depth: the parameter counts differ by Aaren's query tokens only.
    params = {row["model"]: row["params"] for row in result["results"] if "params" in row}
    assert abs(params["aaren DT"] / params["transformer DT"] - 1) < 0.01
    assert os.path.getsize(result["plot"]) > 0 and os.path.getsize(result["latency_plot"]) > 0

    # The dataset is a function of the seed: collected again in an empty cache, it is the same,
    # and its episodes end as D4RL's do (HalfCheetah never terminates, so each hits the limit).
    args = example.parse_args(["--quick", "--cache-dir", str(tmp_path / "again")])
    cached = example.load_dataset(
        "halfcheetah", "medium", example.parse_args(["--quick", "--cache-dir", cache])
    )
    fresh = example.load_dataset("halfcheetah", "medium", args)
    for key in cached:
        np.testing.assert_array_equal(cached[key], fresh[key], err_msg=key)
    lengths = [len(e["rewards"]) for e in example.split_episodes(fresh)]
    assert lengths == [args.episode_steps] * fresh["timeouts"].sum()
    assert not fresh["terminals"].any() and sum(lengths) == len(fresh["rewards"])


def test_edge_deployment_quick(tmp_path):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the exports convert TensorFlow graphs")
    example = load_example("edge_deployment")
    result = example.main(["--quick", "--output-dir", str(tmp_path)])
    rows = {(r["model"], r["runtime"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {
        (model, runtime, quantization or "float32")
        for model in ("quickstart classifier", "CO2 forecaster")
        for runtime, quantization in example.QUICK_VARIANTS
    }
    for (*_, precision), row in rows.items():
        assert row["file_bytes"] > 0
        if precision == "float32":
            # Replayed token by token, the float32 step gives the Keras model's outputs.
            assert row["max_abs_difference"] < 1e-4
            assert row["value"] == pytest.approx(row["keras_value"], abs=1e-4)
    # A stream resumed in a new interpreter from its saved state goes on exactly.
    assert result["resumed_difference"] == 0.0
    assert os.path.getsize(result["plot"]) > 0
