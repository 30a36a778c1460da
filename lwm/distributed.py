"""`jax.distributed` set-up from the `--jax_distributed.*` flags (the original's names).

    --jax_distributed.initialize_jax_distributed=True
    --jax_distributed.coordinator_address=10.0.0.1:1234 --jax_distributed.num_processes=2
    --jax_distributed.process_id=0 [--jax_distributed.local_device_ids=0,1,2,3]

On TPU pods and SLURM/Kubernetes GPU clusters the three addresses can be left empty:
`jax.distributed.initialize()` discovers them.
"""
from __future__ import annotations

import jax
from ml_collections import ConfigDict


class JaxDistributedConfig:
    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.initialize_jax_distributed = False
        config.coordinator_address = ""
        config.num_processes = 1
        config.process_id = 0
        config.local_device_ids = ""  # comma-separated, '' = all
        config.heartbeat_timeout_seconds = 100  # a process silent this long is dead: the others stop with an error
        if updates is not None:
            config.update(ConfigDict(updates).copy_and_resolve_references())
        return config

    @classmethod
    def initialize(cls, config) -> None:
        config = cls.get_default_config(config)
        if not config.initialize_jax_distributed:
            return
        kwargs = {}
        if config.coordinator_address:
            kwargs.update(coordinator_address=config.coordinator_address,
                          num_processes=int(config.num_processes), process_id=int(config.process_id))
        kwargs["heartbeat_timeout_seconds"] = int(config.heartbeat_timeout_seconds)
        if config.local_device_ids:
            kwargs["local_device_ids"] = [int(x) for x in str(config.local_device_ids).split(",") if x.strip()]
        jax.distributed.initialize(**kwargs)
