"""One sequence across devices: `keras_aaren.distribution.ContextParallel`.

The checks on 4 and 8 virtual CPU devices run `context_parallel_checks.py` in a subprocess (the
devices must be set up before JAX starts), in the JAX test run only: `keras.distribution` is
JAX's. The algorithm itself, a shard's message and its scan once it has every shard's, is
`keras.ops`: it is also checked here on the backend of the run, with the shards taken one after
another on one device, against the naive oracle.
"""

import functools
import os

import keras
import numpy as np
import pytest
from helpers import run_on_cpu_devices, to_numpy

from keras_aaren.ops import aaren_attention_naive, aaren_scan
from keras_aaren.ops.context_parallel import scan_shard, shard_message

SCRIPT = os.path.join(os.path.dirname(__file__), "context_parallel_checks.py")
TOLERANCE = 1e-5

jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution runs on JAX only"
)


@functools.cache
def checks(devices):
    """The JSON that `context_parallel_checks.py` prints on `devices` virtual CPU devices."""
    return run_on_cpu_devices(SCRIPT, devices, devices)


@jax_only
@pytest.mark.parametrize("devices", [4, 8])
def test_scan_on_shards_equals_one_device(devices):
    results = checks(devices)
    assert results["devices"] == devices
    gaps = {k: v for k, v in results.items() if k.startswith("ops/") and not k.endswith("scale")}
    # Each (case, mesh) pair checks outputs, final state and gradients.
    pairs = {k.rsplit("/", 1)[0] for k in gaps}
    assert len(pairs) >= 2 and len(gaps) == 3 * len(pairs)
    assert max(gaps.values()) < TOLERANCE, {k: v for k, v in gaps.items() if v >= TOLERANCE}
    # The outputs are of order 1, so the gaps are relative ones too.
    assert all(results[k] > 1 for k in results if k.endswith("/scale"))


@jax_only
@pytest.mark.parametrize("devices", [4, 8])
def test_fit_on_shards_ends_with_one_devices_weights(devices):
    results = checks(devices)
    # Four SGD steps moved the weights by ~0.2; sharded training follows to float rounding.
    assert results["model/moved"] > 0.05
    trained = [k for k in results if k.endswith("/weight_gap")]
    assert trained
    for key in trained:
        assert results[key.replace("weight_gap", "initial_gap")] == 0.0
        assert results[key] < TOLERANCE, key


@jax_only
def test_scan_exchanges_summaries_not_tokens():
    results = checks(4)
    # Each device holds a quarter of the 128 tokens of each of the 4 rows (2 heads).
    assert results["communication/shard_shape"] == [4, 32, 2]
    kinds = results["communication/collectives"]
    # It did run on the shards: the summaries of the 4 shards, (N, B, H, 2 + D) = (4, 4, 2, 5),
    # and the integers (first and last ids, a start inside) gathered.
    assert ["all-gather", "f32[4,4,2,5]"] in kinds
    assert ["all-gather", "s32[4,4,3]"] in kinds
    # ... and nothing of the length's size crosses a device, forward or backward.
    assert results["communication/moves_tokens"] == []


@jax_only
def test_model_exchanges_summaries_not_tokens():
    results = checks(4)
    assert results["model_communication/moves_tokens"] == []


# --- The algorithm on the backend of the run, one shard after another. -----------------------


def sharded_scan(scores, values, initial, mask, ids, shards):
    """`aaren_scan` over `shards` equal parts of the time axis, as the devices would run it."""
    steps = scores.shape[1]
    size = steps // shards
    parts = [slice(i * size, (i + 1) * size) for i in range(shards)]

    def local_scan(scores, values, initial_state, mask, segment_ids):
        return aaren_scan(
            scores, values, initial_state=initial_state, mask=mask, segment_ids=segment_ids
        )

    messages = [shard_message(scores[:, p], values[:, p], mask[:, p], ids[:, p]) for p in parts]
    floats = keras.ops.stack([f for f, _ in messages])
    ints = keras.ops.stack([i for _, i in messages])
    initial = tuple(keras.ops.convert_to_tensor(x) for x in initial)
    outputs, final = [], None
    for index, p in enumerate(parts):
        out, final = scan_shard(
            local_scan,
            scores[:, p],
            values[:, p],
            initial,
            mask[:, p],
            ids[:, p],
            floats,
            ints,
            index,
        )
        outputs.append(to_numpy(out))
    return np.concatenate(outputs, axis=1), [to_numpy(x) for x in final]


def test_shards_joined_equal_the_naive_oracle():
    rng = np.random.default_rng(0)
    batch, steps, heads, dim, shards = 4, 32, 2, 3, 4
    scores = (rng.normal(size=(batch, steps, heads)) * 3).astype("float32")
    scores[1, :, 0] = 10.0 * np.arange(steps)  # a ramp over hundreds of units
    values = rng.normal(size=(batch, steps, heads, dim)).astype("float32")
    mask = rng.random((batch, steps)) > 0.25
    mask[2, 8:16] = False  # a whole shard masked
    mask[3, 5:] = False  # nothing real after token 4 ...
    ids = np.zeros((batch, steps), "int32")
    ids[0, 8:] = 1  # a segment starting on a shard border, spanning the other shards
    ids[1, 7:] = 2  # ... one starting just before a border
    ids[1, 20:] = 3
    ids[1, 21:] = 4  # ... and one of one token
    ids[3, 27:] = 5  # ... and a segment starting in that masked stretch
    initial = (
        rng.normal(size=(batch, heads)).astype("float32"),
        rng.uniform(0.5, 2.0, size=(batch, heads)).astype("float32"),
        rng.normal(size=(batch, heads, dim)).astype("float32"),
    )
    outputs, final = sharded_scan(scores, values, initial, mask, ids, shards)
    expected, expected_final = aaren_attention_naive(
        scores.astype("float64"),
        values.astype("float64"),
        initial_state=tuple(x.astype("float64") for x in initial),
        mask=mask,
        segment_ids=ids,
    )
    np.testing.assert_allclose(outputs, to_numpy(expected), atol=TOLERANCE)
    # u and w are relative to m; compare the states through their readout and their mass.
    m, u, w = final
    em, eu, ew = (to_numpy(x) for x in expected_final)
    seen = eu > 0
    np.testing.assert_array_equal(u > 0, seen)
    np.testing.assert_allclose(m[seen], em[seen], atol=TOLERANCE)
    np.testing.assert_allclose(u, eu, rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(w, ew, atol=TOLERANCE)


# --- The distribution object. -----------------------------------------------------------------


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="the other backends refuse it")
def test_context_parallel_refuses_other_backends():
    from keras_aaren.distribution import ContextParallel

    with pytest.raises(ValueError, match="JAX backend only"):
        ContextParallel()


def one_device_mesh(names):
    devices = keras.distribution.list_devices()[:1]
    return keras.distribution.DeviceMesh((1,) * len(names), names, devices)


@jax_only
def test_context_parallel_lays_out_batch_and_time():
    from keras_aaren.distribution import ContextParallel

    mesh = one_device_mesh(["batch", "sequence"])
    both = ContextParallel(mesh, batch_dim_name="batch")
    assert both.get_data_layout((8, 32, 5)).axes == ("batch", "sequence", None)
    assert both.get_data_layout((8, 32)).axes == ("batch", "sequence")
    assert both.get_data_layout((8,)).axes == ("batch",)
    assert (both.batch_dim_name, both.sequence_dim_name) == ("batch", "sequence")
    assert both.num_model_replicas == both.num_sequence_shards == 1
    alone = ContextParallel(one_device_mesh(["sequence"]))
    assert alone.batch_dim_name is None
    assert alone.get_data_layout((8, 32, 5)).axes == (None, "sequence", None)
    assert isinstance(alone, keras.distribution.ModelParallel)
    # Every device on the sequence axis by default.
    default = ContextParallel()
    assert default.device_mesh.axis_names == ["sequence"]
    assert default.num_sequence_shards == len(keras.distribution.list_devices())


@jax_only
def test_one_sequence_shard_runs_the_plain_scan():
    from keras_aaren.distribution import ContextParallel

    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 9, 2)).astype("float32")
    values = rng.normal(size=(2, 9, 2, 3)).astype("float32")
    with ContextParallel(one_device_mesh(["sequence"])).scope():
        outputs, _ = aaren_scan(scores, values)
    expected, _ = aaren_attention_naive(scores, values)
    np.testing.assert_allclose(to_numpy(outputs), to_numpy(expected), atol=TOLERANCE)


@jax_only
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sequence_dim_name": "time"}, r"`sequence_dim_name` must name an axis.*'time'"),
        ({"batch_dim_name": "data"}, r"`batch_dim_name` must name an axis.*'data'"),
        ({"batch_dim_name": "sequence"}, r"`batch_dim_name` must name an axis.*other than"),
        ({"device_mesh": "sequence"}, r"`device_mesh` must be a keras.distribution.DeviceMesh"),
    ],
)
def test_context_parallel_refuses_bad_axes(kwargs, match):
    from keras_aaren.distribution import ContextParallel

    kwargs = {"device_mesh": one_device_mesh(["sequence"]), **kwargs}
    with pytest.raises(ValueError, match=match):
        ContextParallel(**kwargs)


@jax_only
def test_context_parallel_refuses_a_layout_map_on_another_mesh():
    from keras_aaren.distribution import ContextParallel

    layout_map = keras.distribution.LayoutMap(one_device_mesh(["sequence"]))
    with pytest.raises(ValueError, match="`layout_map` must be built on `device_mesh`"):
        ContextParallel(one_device_mesh(["sequence"]), layout_map=layout_map)
