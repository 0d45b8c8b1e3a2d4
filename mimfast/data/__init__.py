"""Input data for mimfast: DALI pipelines (train / eval, sharded, exactly resumable), a built-in procedural dataset,
webdataset packing and a dataset validator.

    cfg = DataConfig(root="builtin", img_size=224)             # or an ImageNet-layout folder / webdataset root
    loader = build_loader(cfg, batch_size=256, rank=rank, world_size=world, device_id=local_rank)
    for batch in loader:                                        # one epoch; len(loader) batches on every rank
        batch.images, batch.labels                              # (B, 3, 224, 224) float32, (B,) int64
    ckpt = loader.state_dict()                                  # build_loader(..., state=ckpt) continues exactly

    report = validate_dataset("/data/imagenet")                 # files DALI cannot decode, before they abort a run

Only the pipelines and the validator need NVIDIA DALI (``pip install 'mimfast[dali]'``); it is imported on first use.
"""

from .builtin import (
    BUILTIN_CLASSES,
    default_builtin_root,
    list_folder_split,
    make_builtin_dataset,
    make_webdataset_shards,
)
from .errors import DataError, DataPathError, DataValueError, UndecodableImageError
from .pipeline import IMAGENET_MEAN, IMAGENET_STD, Batch, DataConfig, MIMLoader, build_loader, denormalize
from .validate import ValidationReport, add_validate_arguments, cmd_validate, find_undecodable, validate_dataset

__all__ = [
    "BUILTIN_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "DataConfig",
    "DataError",
    "DataPathError",
    "DataValueError",
    "MIMLoader",
    "UndecodableImageError",
    "ValidationReport",
    "add_validate_arguments",
    "build_loader",
    "cmd_validate",
    "default_builtin_root",
    "denormalize",
    "find_undecodable",
    "list_folder_split",
    "make_builtin_dataset",
    "make_webdataset_shards",
    "validate_dataset",
]
