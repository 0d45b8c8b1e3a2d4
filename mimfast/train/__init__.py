"""mimfast.train: the pretraining launcher (``mimfast pretrain``): typed configs and presets, a DDP / FSDP2 training
loop with MAE's recipe, atomic checkpoints with exact resume.

Python API::

    from mimfast.train import get_config, pretrain, load_checkpoint
    cfg = get_config("mae_debug", ["train.max_steps=20", "train.out_dir=/tmp/run"])
    result = pretrain(cfg)                       # RunResult: step, losses, checkpoint, metrics, tensorboard...
    ckpt = load_checkpoint("/tmp/run")           # newest valid checkpoint: ckpt["model"], ckpt["config"], ckpt["step"]

Command line: ``mimfast pretrain --config mae_debug train.epochs=3 optim.blr=1e-4`` (``--print-config`` to list every
key); multi-GPU: ``torchrun --nproc_per_node 8 -m mimfast.cli pretrain --config mae_vit_base data.root=/data/imagenet``.
"""

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from .config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    flatten_config,
    get_config,
    list_configs,
    lr_at,
    scaled_lr,
)
from .loop import NonFiniteLossError, RunResult, pretrain
from .optim import param_groups, peak_flops
from .signals import TrainingInterrupted

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "RunResult",
    "TrainConfig",
    "TrainingInterrupted",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "flatten_config",
    "get_config",
    "list_checkpoints",
    "list_configs",
    "load_checkpoint",
    "lr_at",
    "param_groups",
    "peak_flops",
    "pretrain",
    "scaled_lr",
]
