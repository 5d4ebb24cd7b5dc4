"""Data: MNIST, Fashion-MNIST and affNIST files (checked, fetched, read), the validation and
evaluation splits, and the image transforms the suites apply."""

from capsbench.data.affnist import (
    AFFNIST_FOLDER,
    AFFNIST_SHAPE,
    find_affnist,
    load_affnist_test,
    read_affnist_mat,
)
from capsbench.data.datasets import Dataset, DataWarning, clear_cache, data_checksums, data_info, load_dataset
from capsbench.data.fetch import ensure_dataset, fetch_dataset
from capsbench.data.files import FileInfo, file_info
from capsbench.data.idx import read_idx
from capsbench.data.specs import DATA_ENV, DATASETS, DatasetSpec, canonical_name, resolve_data_root

__all__ = [
    "AFFNIST_FOLDER",
    "AFFNIST_SHAPE",
    "DATASETS",
    "DATA_ENV",
    "DataWarning",
    "Dataset",
    "DatasetSpec",
    "FileInfo",
    "canonical_name",
    "clear_cache",
    "data_checksums",
    "data_info",
    "ensure_dataset",
    "fetch_dataset",
    "file_info",
    "find_affnist",
    "load_affnist_test",
    "load_dataset",
    "read_affnist_mat",
    "read_idx",
    "resolve_data_root",
]
