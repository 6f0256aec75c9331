"""Runs Aaren with the time axis split across N virtual CPU devices and compares it with one
device; prints the largest differences as JSON. Run by `test_context_parallel.py` in a subprocess,
because the devices must be set up before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 KERAS_BACKEND=jax \\
        python tests/context_parallel_checks.py 4

* op level: `aaren_scan` with `ContextParallel`'s `sequence_sharding` (one `jax.jit`) against
  the same scan on one device: outputs, final states and the gradients of all inputs, with
  masks, segments (one starting exactly on a shard border, one spanning several shards, one of
  length 1, one starting in a masked stretch), an initial state, score ramps of ±10·i, a
  length that the shards do not divide, and every method; on a mesh of the sequence alone and
  of batch × sequence.
* communication: the collectives of the compiled forward and backward program at two lengths
  (they must be the same), and the shape of one device's shard of the input.
* model level: a model of `Aaren` and `AarenBlock` layers on packed rows (`segment_ids`)
  trained with `model.fit` under `ContextParallel` against one device.
"""

import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A collective's line in an optimized HLO module: its result type (an array, or a tuple of
# them), its kind; "-start" for the asynchronous form, whose tuple holds operands then results.
COLLECTIVE = re.compile(
    r"= (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\("
)


def collectives(compiled_text):
    """(kind, shape) of every array a collective of an optimized HLO module returns."""
    found = []
    for line in compiled_text.splitlines():
        match = COLLECTIVE.search(line)
        if match is None:
            continue
        result, kind, asynchronous = match.groups()
        # Scalars (`u32[]`) are the asynchronous form's bookkeeping, not data.
        arrays = re.findall(r"\w+\[[\d,]+\]", result)
        if asynchronous:
            arrays = arrays[len(arrays) // 2 :]
        found += [(kind, shape) for shape in arrays]
    return sorted(found)


def scan_data(rng, batch, steps, shards):
    """Scores, values, mask, segment ids and an initial state that exercise the shard borders."""
    import numpy as np

    heads, dim = 2, 3
    length = steps // shards  # tokens per shard (the last may hold fewer when padded)
    position = np.arange(steps, dtype="float32")
    scores = rng.normal(size=(batch, steps, heads)).astype("float32") * 2
    scores[2] += 10 * position[:, None]  # ramps that span hundreds of units
    scores[3] -= 10 * position[:, None]
    values = rng.normal(size=(batch, steps, heads, dim)).astype("float32")
    mask = rng.random((batch, steps)) > 0.25
    mask[:, 0] = True
    segments = np.zeros((batch, steps), "int32")
    # Row 0: one segment over every shard. Row 1: a segment starting exactly on the first shard
    # border, another from inside shard 1 to the end (across the other shards), one token long.
    segments[1, length:] = 1
    segments[1, length + 2 :] = 2
    segments[1, length + 3 :] = 3
    # Row 2: a start just before a border, then a whole shard masked.
    segments[2, length - 1 :] = 4
    mask[2, length : 2 * length] = False
    # Row 3: nothing real after token 5, and a segment starting in that masked stretch: the
    # final state is the empty one.
    mask[3, 6:] = False
    segments[3, steps - length - 1 :] = 7
    initial = (
        rng.normal(size=(batch, heads)).astype("float32"),
        rng.uniform(0.5, 2.0, size=(batch, heads)).astype("float32"),
        rng.normal(size=(batch, heads, dim)).astype("float32"),
    )
    return scores, values, mask, segments, initial


def scan_function(method, with_mask, with_segments, with_initial, sharding=None):
    """A function of the scan's outputs, final state and a scalar loss over all of them, with the
    loss's gradients; on the devices of `sharding` (a `SequenceSharding`), or on one."""
    import jax

    from keras_aaren.ops import aaren_scan

    def forward(scores, values, m0, u0, w0, mask, segments, cotangents):
        outputs, final = aaren_scan(
            scores,
            values,
            initial_state=(m0, u0, w0) if with_initial else None,
            mask=mask if with_mask else None,
            segment_ids=segments if with_segments else None,
            method=method,
            sharding=sharding,
        )
        loss = sum((x * c).sum() for x, c in zip((outputs, *final), cotangents, strict=True))
        return loss, (outputs, *final)

    def run(*args):
        (_, results), grads = jax.value_and_grad(forward, argnums=(0, 1, 2, 3, 4), has_aux=True)(
            *args
        )
        return results, grads

    return run


def gap(a, b):
    import numpy as np

    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))


# What each device count runs: (case, mesh) pairs at op level, the meshes of the model-level
# run, and whether to compile the communication checks. Split so that the two runs together
# cover every case and both meshes while staying within a minute of CPU.
PLAN = {
    4: {
        "ops": [
            ("segments", "batch_sequence"),
            ("plain", "sequence"),
            ("uneven", "sequence"),
            ("sequential", "sequence"),
        ],
        "model": ["sequence"],
        "communication": True,
    },
    8: {
        "ops": [("segments", "sequence"), ("associative", "batch_sequence")],
        "model": ["batch_sequence"],
        "communication": False,
    },
}

# name: (method, length (tokens per shard, tokens short of that times the shards), mask,
# segments, initial state). "uneven" has a length the shards do not divide.
CASES = {
    "segments": ("auto", (16, 0), True, True, True),
    "plain": ("auto", (16, 0), False, False, False),
    "uneven": ("auto", (16, 3), True, True, False),
    "associative": ("associative", (4, 0), True, True, True),
    "sequential": ("sequential", (4, 0), True, True, True),
}


def distributions(shards):
    """`ContextParallel` on a mesh of the sequence alone, and of batch (2) × sequence."""
    import keras

    from keras_aaren.distribution import ContextParallel

    return {
        "sequence": ContextParallel(keras.distribution.DeviceMesh((shards,), ["sequence"])),
        "batch_sequence": ContextParallel(
            keras.distribution.DeviceMesh((2, shards // 2), ["batch", "sequence"]),
            batch_dim_name="batch",
        ),
    }


def check_ops(devices, pairs, results):
    import jax
    import numpy as np

    shards = len(devices)
    meshes = distributions(shards)
    rng = np.random.default_rng(0)
    for case in dict.fromkeys(case for case, _ in pairs):
        method, (per_shard, short), with_mask, with_segments, with_initial = CASES[case]
        steps = per_shard * shards - short
        scores, values, mask, segments, initial = scan_data(rng, 4, steps, shards)
        cotangents = [
            rng.normal(size=shape).astype("float32")
            for shape in (values.shape, *(x.shape for x in initial))
        ]
        args = (scores, values, *initial, mask, segments, cotangents)
        flags = (with_mask, with_segments, with_initial)
        one = jax.jit(scan_function(method, *flags))(*args)
        for name in (mesh for c, mesh in pairs if c == case):
            sharding = meshes[name].sequence_sharding
            split = jax.jit(scan_function(method, *flags, sharding))(*args)
            results[f"ops/{case}/{name}/outputs"] = gap(one[0][:1], split[0][:1])
            results[f"ops/{case}/{name}/final_state"] = gap(one[0][1:], split[0][1:])
            results[f"ops/{case}/{name}/gradients"] = gap(one[1], split[1])
        results[f"ops/{case}/scale"] = float(np.abs(one[0][0]).max())


def check_communication(devices, results):
    """The collectives of the compiled forward and backward programs, of the scan and of a model,
    and the shape of one device's shard of an input.

    The length, 32 N, and its shard, 32, are sizes no other axis has here: a collective with
    either in its shape moves tokens, one without moves summaries or weights only.
    """
    import jax
    import numpy as np

    shards = len(devices)
    steps = 32 * shards
    distribution = distributions(shards)["sequence"]
    rng = np.random.default_rng(1)
    with distribution.scope():
        scores, values, mask, segments, initial = scan_data(rng, 4, steps, shards)
        cotangents = [
            np.ones(shape, "float32") for shape in (values.shape, *(x.shape for x in initial))
        ]
        layout = distribution.get_data_layout(scores.shape).backend_layout
        scores = jax.device_put(scores, layout)
        results["communication/shard_shape"] = list(scores.addressable_shards[0].data.shape)
        run = jax.jit(scan_function("auto", True, True, True, distribution.sequence_sharding))
        args = (scores, values, *initial, mask, segments, cotangents)
        found = {"communication": collectives(run.lower(*args).compile().as_text())}

        model = build_model(steps)
        trainable = [v.value for v in model.trainable_variables]
        fixed = [v.value for v in model.non_trainable_variables]

        def loss(trainable, x):
            outputs, _ = model.stateless_call(trainable, fixed, x)
            return (outputs**2).mean()

        x = np.ones((4, steps, 5), "float32")
        x = jax.device_put(x, distribution.get_data_layout(x.shape).backend_layout)
        text = jax.jit(jax.grad(loss)).lower(trainable, x).compile().as_text()
        found["model_communication"] = collectives(text)
    for name, listed in found.items():
        results[f"{name}/collectives"] = listed
        results[f"{name}/moves_tokens"] = [
            shape for _, shape in listed if set(dims(shape)) & {steps, steps // shards}
        ]


def dims(shape):
    """The sizes in an HLO shape such as `f32[4,32,2]`."""
    return [int(x) for x in shape.split("[", 1)[1].rstrip("]").split(",")]


def build_model(steps, segments=False):
    """Dense, an AarenBlock, an Aaren layer, LayerNormalization and Dense; with `segments`, a
    second input of segment ids that both Aaren layers read."""
    import keras

    from keras_aaren import Aaren, AarenBlock

    inputs = [keras.Input((steps, 5))]
    packed = {}
    if segments:
        inputs.append(keras.Input((steps,), dtype="int32"))
        packed = {"segment_ids": inputs[1]}
    x = keras.layers.Dense(16)(inputs[0])
    x = AarenBlock(2, 8, ffn_dim=24, dropout=0.0, return_sequences=True)(x, **packed)
    x = Aaren(2, 8, return_sequences=True)(x, **packed)
    outputs = keras.layers.Dense(3)(keras.layers.LayerNormalization()(x))
    model = keras.Model(inputs, outputs)
    # Plain SGD: its step scales with the gradient, so a shard whose gradient were lost shows.
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def check_model(devices, meshes, results):
    """`model.fit` under `ContextParallel` against one device: the weights after 4 SGD steps,
    on rows that pack several sequences (segments that start on a shard border, inside a
    shard, and span several shards)."""
    import contextlib

    import keras
    import numpy as np

    shards = len(devices)
    steps = 4 * shards
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, steps, 5)).astype("float32")
    ids = np.cumsum(rng.random((16, steps)) < 0.15, axis=1).astype("int32")
    ids[:, 4:] += 100  # every row: a segment starting on the first shard border
    # Per-token targets that need the past: a running mean and a running max.
    y = np.stack(
        [
            np.cumsum(x[..., 0], 1) / np.arange(1, steps + 1),
            np.maximum.accumulate(x[..., 1], 1),
            x[..., 2],
        ],
        -1,
    )

    def train(distribution):
        with contextlib.nullcontext() if distribution is None else distribution.scope():
            keras.utils.set_random_seed(0)
            model = build_model(steps, segments=True)
            initial = model.get_weights()
            model.fit([x, ids], y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            return initial, model.get_weights()

    initial, one = train(None)
    results["model/moved"] = gap(initial, one)
    for name in meshes:
        start, split = train(distributions(shards)[name])
        results[f"model/{name}/initial_gap"] = gap(initial, start)
        results[f"model/{name}/weight_gap"] = gap(one, split)


def main(count):
    import jax

    devices = jax.devices()
    if len(devices) != count:
        raise SystemExit(f"expected {count} devices, found {len(devices)}: set XLA_FLAGS")
    plan = PLAN[count]
    results = {"devices": len(devices)}
    check_ops(devices, plan["ops"], results)
    check_model(devices, plan["model"], results)
    if plan["communication"]:
        check_communication(devices, results)
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]))
