"""LightningDataModules for every task: one contract (``TaskDataModule``), one file per source."""

from piggyback.data.base import DataError, LoaderOptions, TaskDataModule
from piggyback.data.decathlon import DecathlonDataModule
from piggyback.data.decathlon_devkit import write_results_json
from piggyback.data.digits import DigitsDataModule  # noqa: E402  (offline demo tasks)
from piggyback.data.finegrained import FineGrainedDataModule, ImageFolderDataModule
from piggyback.data.torchvision_sets import TorchvisionDataModule

__all__ = [
    "DataError",
    "DecathlonDataModule",
    "DigitsDataModule",
    "FineGrainedDataModule",
    "ImageFolderDataModule",
    "LoaderOptions",
    "TaskDataModule",
    "TorchvisionDataModule",
    "write_results_json",
]
