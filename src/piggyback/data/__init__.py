"""LightningDataModules for every task: one contract (``TaskDataModule``), one file per source."""

from piggyback.data.base import DataError, TaskDataModule
from piggyback.data.decathlon import DecathlonDataModule, write_results_json
from piggyback.data.finegrained import FineGrainedDataModule
from piggyback.data.torchvision_sets import TorchvisionDataModule

# Demo / digits data (piggyback.data.digits) is exported here too; add its import below.

__all__ = [
    "DataError",
    "DecathlonDataModule",
    "FineGrainedDataModule",
    "TaskDataModule",
    "TorchvisionDataModule",
    "write_results_json",
]
