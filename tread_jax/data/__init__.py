"""Input data: TFDS array_record datasets read through grain (see ``pipeline``)."""

from tread_jax.data.pipeline import (
    DATASETS,
    DatasetInfo,
    DatasetSpec,
    create_train_iterator,
    dataset_info,
    default_config,
    default_data_dir,
    load_split_arrays,
    pixel_decoder,
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetSpec",
    "create_train_iterator",
    "dataset_info",
    "default_config",
    "default_data_dir",
    "load_split_arrays",
    "pixel_decoder",
]
