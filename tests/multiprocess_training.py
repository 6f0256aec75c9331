"""One process of a two-process training run on localhost, compared with training in one process.

`test_multiprocess.py` starts this script twice, once per process, and reads the JSON line each
prints last: how far the weights it ends with are from those of the same training on one device,
and how far training moved them.

    # JAX: ContextParallel over 2 processes × 2 CPU devices each, one report per layout
    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \\
        python tests/multiprocess_training.py jax <process_id> 127.0.0.1:<port> \\
        batch-across sequence-across
    # TensorFlow: MultiWorkerMirroredStrategy, the cluster in TF_CONFIG
    TF_CONFIG='{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": 0}}' \\
        KERAS_BACKEND=tensorflow python tests/multiprocess_training.py tensorflow
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SAMPLES, LENGTH, FEATURES = 32, 16, 5
GLOBAL_BATCH = 16
EPOCHS = 2


def build_model():
    import keras

    from keras_aaren import Aaren, AarenBlock

    inputs = keras.Input((LENGTH, FEATURES))
    x = keras.layers.Dense(16)(inputs)
    x = AarenBlock(2, 8, ffn_dim=16, dropout=0.0, return_sequences=True)(x)
    outputs = keras.layers.Dense(3)(Aaren(2, 8)(x))
    model = keras.Model(inputs, outputs)
    # Plain SGD: its step scales with the gradient, so a process whose gradient were dropped, or
    # gradients summed instead of averaged, would show in the weights.
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def make_data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, LENGTH, FEATURES)).astype("float32")
    # Targets that depend on early, late and all steps, so every time shard matters.
    y = np.stack([x[:, :, 0].mean(1), x[:, -4:, 1].sum(1), x[:, :3, 2].max(1)], -1)
    return x, y


def initial_weights():
    import keras

    keras.utils.set_random_seed(0)
    return build_model().get_weights()


def train(model, weights, x, y, batch_size):
    model.set_weights(weights)
    history = model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0)
    return model.get_weights(), history.history["loss"]


def report(initial, one_device, distributed, **extra):
    import numpy as np

    def gap(a, b):
        return max(float(np.abs(np.subtract(u, v)).max()) for u, v in zip(a, b))

    print(
        json.dumps(
            {
                **extra,
                "weight_gap": gap(one_device[0], distributed[0]),
                "loss_gap": gap([one_device[1]], [distributed[1]]),
                "moved": gap(initial, distributed[0]),
                "loss": distributed[1],
            }
        ),
        flush=True,
    )


def process_local(array, distribution, batch_size):
    """This process's part of every global batch of `array`, laid end to end.

    With several processes, each passes `fit` only the part of each global batch that its own
    devices hold under the distribution's data layout (Keras' JAX trainer assembles the global
    batch from those parts); the part is read from the layout, so it is right for any mesh.
    """
    import numpy as np

    shape = (batch_size, *array.shape[1:])
    sharding = distribution.get_data_layout(shape).backend_layout
    boxes = list(sharding.addressable_devices_indices_map(shape).values())
    # The devices of one process hold one block of the batch: its bounds in each dimension.
    box = tuple(
        slice(
            min(b[d].indices(shape[d])[0] for b in boxes),
            max(b[d].indices(shape[d])[1] for b in boxes),
        )
        for d in range(len(shape))
    )
    batches = [array[i : i + batch_size] for i in range(0, len(array), batch_size)]
    return np.concatenate([batch[box] for batch in batches])


def context_parallel(name):
    """`ContextParallel` on a 2 × 2 mesh (batch × sequence) over 2 processes of 2 devices each."""
    import jax
    import keras
    import numpy as np

    # One row per process: the mesh below says which of its axes crosses the processes.
    devices = np.array(keras.distribution.list_devices()).reshape(2, 2)
    owners = np.array([device.process_index for device in jax.devices()]).reshape(2, 2)
    assert (owners == [[0, 0], [1, 1]]).all(), owners
    from keras_aaren.distribution import ContextParallel

    if name == "batch-across":  # the batch split between the processes, time within each
        mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "sequence"], devices)
    elif name == "sequence-across":  # time split between the processes: summaries cross them
        mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "sequence"], devices.T)
    else:
        raise ValueError(f"Expected 'batch-across' or 'sequence-across'. Received: {name!r}")
    # Each process passes `fit` its own part of every batch, so Keras must not cut the data
    # again (it would cut a tf.data.Dataset along the batch only).
    return ContextParallel(
        mesh, sequence_dim_name="sequence", batch_dim_name="batch", auto_shard_dataset=False
    )


def run_jax(process_id, coordinator, *layouts):
    import keras
    import numpy as np

    keras.distribution.initialize(
        job_addresses=coordinator, num_processes=2, process_id=int(process_id)
    )
    import jax

    assert jax.process_count() == 2 and jax.local_device_count() == 2, jax.devices()

    x, y = make_data()
    initial = initial_weights()
    # The reference: the same training, in this process, on one device, without a distribution.
    one_device = train(build_model(), initial, x, y, GLOBAL_BATCH)

    for name in layouts:
        distribution = context_parallel(name)
        keras.distribution.set_distribution(distribution)
        x_local = process_local(x, distribution, GLOBAL_BATCH)
        y_local = process_local(y, distribution, GLOBAL_BATCH)
        local_batch = GLOBAL_BATCH * len(x_local) // len(x)
        distributed = train(build_model(), initial, x_local, y_local, local_batch)
        keras.distribution.set_distribution(None)
        report(
            initial,
            one_device,
            distributed,
            layout=name,
            processes=jax.process_count(),
            devices=len(jax.devices()),
            local_batch=[local_batch, *np.shape(x_local)[1:]],
        )


def run_tensorflow():
    import tensorflow as tf

    # Collective ops are set up when the strategy is made, before any other TensorFlow op.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    x, y = make_data()
    initial = initial_weights()
    one_device = train(build_model(), initial, x, y, GLOBAL_BATCH)

    with strategy.scope():
        model = build_model()
        # The optimizer's variables are made here, mirrored on every worker, not inside the step.
        model.optimizer.build(model.trainable_variables)
    model.set_weights(initial)
    # Keras 3's `fit` and `train_on_batch` cannot run under MultiWorkerMirroredStrategy: they
    # reduce their results across workers with `strategy.reduce`, which this strategy refuses
    # for a nest of tensors and for a scalar on axis 0 (keras-team/keras#20585). The loop below
    # is TensorFlow's custom training loop around the model's own `train_step`, the step that
    # `fit` runs: the loss is divided by the number of replicas, the optimizer sums the
    # gradients across the workers.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    # Each worker reads its own rows of every global batch.
    batches = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def train_step(batch):
        logs = strategy.run(model.train_step, args=(batch,))
        return strategy.reduce("MEAN", logs["loss"], axis=None)

    losses = []
    for _ in range(EPOCHS):
        model.reset_metrics()
        for batch in batches:
            loss = train_step(batch)
        losses.append(float(loss))
    distributed = model.get_weights(), losses
    report(
        initial,
        one_device,
        distributed,
        processes=strategy.cluster_resolver.cluster_spec().num_tasks("worker"),
        devices=strategy.num_replicas_in_sync,
    )


if __name__ == "__main__":
    if sys.argv[1] == "jax":
        run_jax(*sys.argv[2:])
    elif sys.argv[1] == "tensorflow":
        run_tensorflow()
    else:
        raise ValueError(f"Expected 'jax' or 'tensorflow'. Received: {sys.argv[1]!r}")
