"""Datasets for calibration and evaluation: folder, zipped (sharded) and RESISC45 layouts on local or
S3 storage, the model's own eval and training transforms, packing into zip shards, calibration subsets and
data-parallel sharding, and skip-aware loading.

    ds = open_dataset("s3://bucket/imagenet", "val", eval_transform(model))
    idx = per_class_subset(ds, 2, seed=3)
    for images, labels, skipped in make_loader(ds, 64, num_workers=4, indices=shard_indices(idx, rank, world)):
        ...
"""
from .base import IMG_EXTS, ImageDataset, decode_image, to_8bit
from .detect import (LAYOUTS, class_mismatch, class_names, detect_layout, label_notes, model_label_names, open_dataset,
                     unused_files, unused_files_warning)
from .errors import DataError, SkipLog, Skipped, SkipRecord
from .folder import FolderDataset
from .loader import SkipAwareLoader, collate_skip, make_loader
from .pack import pack, pack_arrays, write_shards
from .resisc import ImagePathsDataset, load_label_map
from .subsets import (class_quotas, first_batches, limit_subset, per_class_subset, random_subset, shard_indices,
                      stratified_subset)
from .transforms import (TrainTransform, describe_transform, eval_transform, model_fixed_img_size, model_in_chans,
                         train_transform)
from .zipped import INDEX_NAME, Shard, ZipShardDataset, find_shards, load_index

Resisc45Dataset = ImagePathsDataset

__all__ = [
    "class_mismatch", "class_names",
    "DataError", "SkipLog", "SkipRecord", "Skipped",
    "ImageDataset", "FolderDataset", "ZipShardDataset", "ImagePathsDataset", "Resisc45Dataset", "Shard",
    "open_dataset", "unused_files", "unused_files_warning", "label_notes", "model_label_names", "detect_layout", "LAYOUTS", "IMG_EXTS", "decode_image", "find_shards", "load_index",
    "load_label_map", "INDEX_NAME",
    "pack", "pack_arrays", "write_shards",
    "per_class_subset", "first_batches", "random_subset", "shard_indices", "stratified_subset", "class_quotas",
    "limit_subset", "to_8bit",
    "collate_skip", "make_loader", "SkipAwareLoader",
    "eval_transform", "train_transform", "TrainTransform", "describe_transform", "model_in_chans",
    "model_fixed_img_size",
]
