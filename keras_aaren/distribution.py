"""One sequence across devices: `ContextParallel`, a Keras distribution that splits the time axis.

Aaren's output at a token depends on the tokens before it only through the state $(m, u, w)$,
`batch × heads × (2 + value_dim)` numbers whatever the length. So a sequence too long for one
device can be split along time into N shards, one per device: every per-token layer (`Dense`,
`LayerNormalization`, a block's feed-forward) runs on its shard as it is, and each Aaren scan
exchanges only the summaries of the shards (`keras_aaren.ops.context_parallel`). This is the
context parallelism of flash-linear-attention's `fla/ops/cp`, on Keras' own distribution API.

JAX only, as `keras.distribution` is.
"""

import keras

from keras_aaren.ops.context_parallel import SequenceSharding

__all__ = ["ContextParallel", "current_sequence_sharding"]


def current_sequence_sharding():
    """The `SequenceSharding` of the `ContextParallel` distribution in effect, or None.

    What the layers pass to `keras_aaren.ops.aaren_scan` as `sharding`: None on one device, on a
    backend other than JAX, under any other distribution, and where the sequence axis has a
    single device.

    Returns:
        A `keras_aaren.ops.SequenceSharding`, or None.

    Examples:
        >>> current_sequence_sharding() is None  # no distribution set
        True
    """
    if keras.backend.backend() != "jax":
        return None
    distribution = keras.distribution.distribution()
    if isinstance(distribution, ContextParallel):
        return distribution.sequence_sharding
    return None


class ContextParallel(keras.distribution.ModelParallel):
    """A Keras distribution that splits every sequence's time axis across devices.

    Set it with `keras.distribution.set_distribution` (or enter its `scope()`) before building
    the model, then train as usual: `model.fit` places axis 1 (time) of each input on the mesh's
    sequence axis, and axis 0 (batch) on its batch axis if it has one, so each device holds
    `1 / (sequence devices × batch devices)` of every batch. Keras' per-token layers (`Dense`,
    `LayerNormalization`) compute on their shard; `keras_aaren.ops.aaren_scan` (the scan of every
    `Aaren` and `AarenBlock`) runs on each shard and exchanges only each shard's summary:
    `batch × heads × (2 + value_dim)` numbers, whatever the length. Outputs, final states and
    gradients equal one device's to float rounding.

    Variables are replicated unless `layout_map` shards them (as for
    `keras.distribution.ModelParallel`, which this class extends).

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named `sequence_dim_name`
            (and optionally one named `batch_dim_name`, and others a `layout_map` uses). Its
            devices may span several processes (`keras.distribution.list_devices()` lists them
            all). Defaults to the mesh of `layout_map`, or else to all devices on one axis
            named `sequence_dim_name`.
        sequence_dim_name: str, the mesh axis that splits the time axis.
        batch_dim_name: optional str, the mesh axis that splits the batch axis; `None` keeps
            every batch whole on each sequence shard.
        layout_map: optional `keras.distribution.LayoutMap` on the same mesh, for variables
            sharded as in `ModelParallel`; by default every variable is replicated.
        auto_shard_dataset: as for `keras.distribution.ModelParallel`.

    Raises:
        ValueError: on a backend other than JAX, for axis names that are not in the mesh (or
            the same axis for batch and sequence), or a `layout_map` on another mesh.

    Examples:
        A mesh of every device on the sequence axis (`DeviceMesh((2, 4), ["batch",
        "sequence"], devices)` with `batch_dim_name="batch"` also splits the batch):

        >>> import keras
        >>> devices = keras.distribution.list_devices()
        >>> mesh = keras.distribution.DeviceMesh((len(devices),), ["sequence"], devices)
        >>> distribution = ContextParallel(mesh)
        >>> distribution.get_data_layout((8, 4096, 16)).axes  # (batch, time, features)
        (None, 'sequence', None)
        >>> keras.distribution.set_distribution(distribution)  # then build, compile, fit
        >>> keras.distribution.set_distribution(None)
    """

    def __init__(
        self,
        device_mesh=None,
        sequence_dim_name="sequence",
        batch_dim_name=None,
        layout_map=None,
        auto_shard_dataset=True,
    ):
        backend = keras.backend.backend()
        if backend != "jax":
            raise ValueError(
                "`ContextParallel` runs on the JAX backend only (keras.distribution is JAX's). "
                f"Set KERAS_BACKEND=jax. Received: backend={backend!r}"
            )
        if device_mesh is None:
            if layout_map is not None:
                device_mesh = layout_map.device_mesh
            else:
                devices = keras.distribution.list_devices()
                device_mesh = keras.distribution.DeviceMesh(
                    (len(devices),), [sequence_dim_name], devices
                )
        if not isinstance(device_mesh, keras.distribution.DeviceMesh):
            raise ValueError(
                "`device_mesh` must be a keras.distribution.DeviceMesh. "
                f"Received: device_mesh={device_mesh!r}"
            )
        names = list(device_mesh.axis_names)
        if sequence_dim_name not in names:
            raise ValueError(
                f"`sequence_dim_name` must name an axis of the mesh {names}. "
                f"Received: sequence_dim_name={sequence_dim_name!r}"
            )
        if batch_dim_name is not None and (
            batch_dim_name not in names or batch_dim_name == sequence_dim_name
        ):
            raise ValueError(
                f"`batch_dim_name` must name an axis of the mesh {names} other than the "
                f"sequence axis {sequence_dim_name!r}, or be None. "
                f"Received: batch_dim_name={batch_dim_name!r}"
            )
        if layout_map is None:
            layout_map = keras.distribution.LayoutMap(device_mesh)
        elif layout_map.device_mesh is not device_mesh:
            raise ValueError(
                "`layout_map` must be built on `device_mesh` (LayoutMap(device_mesh)). "
                f"Received a layout_map on {layout_map.device_mesh}"
            )
        # Set before ModelParallel's constructor, which reads `num_model_replicas` (see
        # `keras_aaren.compat`).
        self._sequence_axis = sequence_dim_name
        self._batch_axis = batch_dim_name
        self._axis_sizes = dict(zip(names, device_mesh.shape))
        self._sequence_sharding = None
        if self._axis_sizes[sequence_dim_name] > 1:
            self._sequence_sharding = SequenceSharding(
                device_mesh, sequence_dim_name, batch_dim_name
            )
        super().__init__(
            layout_map=layout_map,
            batch_dim_name=batch_dim_name or sequence_dim_name,
            auto_shard_dataset=auto_shard_dataset,
        )

    @property
    def sequence_dim_name(self):
        """The mesh axis that splits the time axis."""
        return self._sequence_axis

    @property
    def batch_dim_name(self):
        """The mesh axis that splits the batch axis, or None."""
        return self._batch_axis

    @property
    def num_sequence_shards(self):
        """How many devices share one sequence: the size of the sequence axis."""
        return self._axis_sizes[self._sequence_axis]

    @property
    def sequence_sharding(self):
        """The `keras_aaren.ops.SequenceSharding` its layers pass to their scans, or None where
        the sequence axis has a single device (nothing to split)."""
        return self._sequence_sharding

    @property
    def num_model_replicas(self):
        # One replica per batch shard: the devices along the sequence axis hold one sequence.
        return 1 if self._batch_axis is None else self._axis_sizes[self._batch_axis]

    def get_data_layout(self, data_shape):
        """Axis 0 on the batch axis (if any); axis 1 on the sequence axis where it divides.

        An input of rank 2 or more whose axis 1 is a multiple of the sequence axis's size is
        taken for a sequence (features, masks, segment ids, per-token targets and sample
        weights) and split along time; others (per-sequence targets of another width) are
        replicated along the sequence axis.
        """
        spec = [None] * len(data_shape)
        if spec and self._batch_axis is not None:
            spec[0] = self._batch_axis
        if len(spec) >= 2 and data_shape[1] is not None:
            if data_shape[1] % self.num_sequence_shards == 0:
                spec[1] = self._sequence_axis
        return keras.distribution.TensorLayout(spec, self.device_mesh)

    def distribute_dataset(self, dataset):
        # Without a batch axis there is one model replica: every process reads the same batches
        # (Keras 3.14's ModelParallel would look the batch axis up in the mesh instead).
        if self._batch_axis is None:
            return dataset
        return super().distribute_dataset(dataset)

    def __repr__(self):
        return (
            f"<ContextParallel device_mesh={self.device_mesh}, "
            f"sequence_dim_name={self._sequence_axis!r}, batch_dim_name={self._batch_axis!r}>"
        )
