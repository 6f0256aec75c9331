"""Trains one small Aaren model twice, on one device and data-parallel on two, and prints the
largest weight and loss differences as JSON. Run by `test_distribution.py` in a subprocess,
because the two CPU devices must be set up before TensorFlow or JAX starts:

    python tests/distributed_training.py mirrored       # tf.distribute.MirroredStrategy
    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \\
        python tests/distributed_training.py data_parallel   # keras.distribution.DataParallel
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_model():
    import keras

    from keras_aaren import Aaren, AarenBlock

    inputs = keras.Input((20, 5))
    x = keras.layers.Dense(16)(inputs)
    x = AarenBlock(2, 8, ffn_dim=32, dropout=0.0, return_sequences=True)(x)
    outputs = keras.layers.Dense(3)(Aaren(2, 8)(x))
    model = keras.Model(inputs, outputs)
    # Plain SGD: unlike Adam, its step scales with the gradient, so a replica whose gradient
    # were dropped, or gradients summed instead of averaged, would show.
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def train(model, weights, x, y):
    model.set_weights(weights)
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return model.get_weights(), history.history["loss"]


def main(engine):
    if engine == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 20, 5)).astype("float32")
    y = np.stack([x[:, :, 0].mean(1), x[:, -5:, 1].sum(1), x[:, :3, 2].max(1)], -1)
    keras.utils.set_random_seed(0)
    single = build_model()
    initial = single.get_weights()
    one_device = train(single, initial, x, y)

    if engine == "mirrored":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            model = build_model()
    elif engine == "data_parallel":
        import jax

        devices = jax.devices()
        replicas = len(devices)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        model = build_model()
    else:
        raise ValueError(f"`engine` must be 'mirrored' or 'data_parallel'. Received: {engine!r}")
    distributed = train(model, initial, x, y)

    weight_gap = max(float(np.abs(a - b).max()) for a, b in zip(one_device[0], distributed[0]))
    loss_gap = float(np.abs(np.subtract(one_device[1], distributed[1])).max())
    print(
        json.dumps(
            {
                "replicas": replicas,
                "weight_gap": weight_gap,
                "loss_gap": loss_gap,
                "loss": distributed[1],
                "moved": float(max(np.abs(a - b).max() for a, b in zip(initial, distributed[0]))),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
