"""Fabric set-up: strategy (auto | ddp | fsdp = FSDP2), precision, devices decided by `fabric run` or the config."""

from __future__ import annotations

import atexit
import os

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision.double import DoublePrecision
from lightning.fabric.strategies import ModelParallelStrategy

from fabric_tram.config import ConfigError, TrainerConfig, validate_trainer
from fabric_tram.contracts import block_classes
from fabric_tram.engine.cpu_memory import keep_freed_cpu_memory


class Float64(DoublePrecision):
    """``64-true`` whose forward outputs stay float64: Fabric's plugin casts them to the default dtype (float32),
    which would put float32 rounding back into every loss and divergence of an exactness test."""

    def convert_output(self, data):
        return data


class ShardedDataParallel(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) with data-parallel size = world size and tensor-parallel size = 1.

    ModelParallelStrategy's ``"auto"`` mesh makes data-parallel size = number of nodes, so ``--devices 4`` on one
    node would shard nothing and feed every rank the same data (docs/design.md). Fix the mesh at launch instead.
    """

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def shard_per_block(model: torch.nn.Module, device_mesh) -> torch.nn.Module:
    """``fully_shard`` every transformer block (the model's ``block_class``), then the root."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    block_class = block_classes(model)
    if block_class is not None:
        for module in model.modules():
            if isinstance(module, block_class):
                fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def launched_by_fabric_cli() -> bool:
    return os.environ.get("LT_CLI_USED") == "1"


def check_device_conflicts(config: TrainerConfig) -> None:
    """`fabric run --devices/--num-nodes` decide; a different explicit value in the config is an error."""
    if not launched_by_fabric_cli():
        return
    for key, env in (("devices", "LT_DEVICES"), ("num_nodes", "LT_NUM_NODES")):
        ours, theirs = getattr(config, key), os.environ.get(env)
        if theirs is None or ours in ("auto", None) or (key == "num_nodes" and ours == 1):
            continue
        if str(ours) != str(theirs):
            flag = "--devices" if key == "devices" else "--num-nodes"
            raise ConfigError(
                f"trainer.{key}={ours} in the config conflicts with `fabric run {flag} {theirs}`: "
                f"drop trainer.{key} from the config (fabric run decides) or launch with {flag} {ours}"
            )
    strategy = os.environ.get("LT_STRATEGY")
    if strategy == "fsdp":
        raise ConfigError(
            "`fabric run --strategy fsdp` selects Lightning's FSDP1 (GPU only); leave --strategy out and set "
            "trainer.strategy=fsdp, which uses FSDP2 on CPU and GPU"
        )


def build_fabric(config: TrainerConfig, loggers=None, plugins=None) -> Fabric:
    check_device_conflicts(config)
    validate_trainer(config)
    if config.strategy == "fsdp" and world_size(config) == 1:
        strategy = "auto"  # one process: nothing to shard; FSDP's hooks, copies and resharding would only cost time
    elif config.strategy == "fsdp":
        strategy = ShardedDataParallel(parallelize_fn=shard_per_block)
    elif config.strategy == "ddp":
        strategy = "ddp"
    else:
        strategy = "auto"
    kwargs = {}
    if not launched_by_fabric_cli():  # `fabric run` passes devices and nodes through the environment
        kwargs = dict(devices=config.devices, num_nodes=config.num_nodes)
    precision = config.precision
    if config.keep_freed_cpu_memory and _resolved_accelerator(config) == "cpu":
        keep_freed_cpu_memory()  # engine/cpu_memory.py: each step's large tensors stop costing page faults
    if plugins is None and precision == "16-mixed" and _resolved_accelerator(config) == "cpu":
        # Fabric turns "16-mixed" on CPU into bf16 autocast without a scaler; ask for a real fp16 GradScaler
        from lightning.fabric.plugins import MixedPrecision

        plugins, precision = [MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))], None
    if plugins is None and precision == "64-true":
        plugins, precision = [Float64()], None
    atexit.unregister(release_process_group)  # registered once per process, however many runs it holds
    atexit.register(release_process_group)
    return Fabric(
        accelerator=config.accelerator,
        strategy=strategy,
        precision=precision,
        plugins=plugins,
        loggers=loggers,
        **kwargs,
    )


def world_size(config: TrainerConfig) -> int:
    """The number of processes the run will have: `fabric run`'s devices × nodes, else the config's (``auto``:
    every visible GPU, or one CPU process)."""
    if launched_by_fabric_cli():
        devices, nodes = os.environ.get("LT_DEVICES", "1"), os.environ.get("LT_NUM_NODES", "1")
        return int(devices) * int(nodes) if devices.isdigit() and nodes.isdigit() else 2  # unknown: shard
    devices = config.devices
    if devices == "auto":
        devices = torch.cuda.device_count() if _resolved_accelerator(config) == "cuda" else 1
    return int(devices) * config.num_nodes


def release_process_group() -> None:
    """Destroy the default process group while the interpreter is still whole, as torch asks of every program
    (pytorch/pytorch#190489: gloo threads left to interpreter finalization can abort a rank with "terminate
    called without an active exception"). Seen here about once in thirty 2-process CPU launches, after all of a
    rank's work; this release did not remove it (once more in 35 launches), so train() also ends with a barrier:
    no rank exits while rank 0 still writes the run's files."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _resolved_accelerator(config: TrainerConfig) -> str:
    if config.accelerator != "auto":
        return config.accelerator
    return "cuda" if torch.cuda.is_available() else "cpu"
