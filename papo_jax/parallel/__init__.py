"""Mesh construction and logical-axis sharding rules (the one place sharding is expressed)."""

from papo_jax.parallel.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    batch_shards,
    constrain,
    constrain_gathered,
    constrain_split,
    logical_partition_spec,
    logical_to_mesh_spec,
    make_mesh,
    make_rules,
    shard_state,
    state_shardings,
    use_mesh_rules,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "batch_shards",
    "constrain",
    "constrain_gathered",
    "constrain_split",
    "logical_partition_spec",
    "logical_to_mesh_spec",
    "make_mesh",
    "make_rules",
    "shard_state",
    "state_shardings",
    "use_mesh_rules",
]

from papo_jax.parallel.multihost import (  # noqa: E402
    GlobalBatches,
    allgather_objects,
    first_process_then_sync,
    global_array,
    global_train_arrays,
    pinned_shardings,
    start_distributed,
    to_host,
)

__all__ += ["GlobalBatches", "allgather_objects", "first_process_then_sync", "global_array", "global_train_arrays",
            "pinned_shardings", "start_distributed", "to_host"]
