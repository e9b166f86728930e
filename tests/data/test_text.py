"""The text DataModule (issue 34): label<TAB>text files, the backbone's tokenizer, padding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from piggyback.data import DataError  # noqa: E402
from piggyback.data.text import TextDataModule, read_tsv  # noqa: E402
from piggyback.utils.inputs import concat_inputs, num_inputs, select_inputs  # noqa: E402


def _module(root, name="sentiment", num_classes=2, tokenizer=None, **kwargs):
    return TextDataModule(
        name, num_classes, root, name, tokenizer=tokenizer, batch_size=8, **kwargs
    )


def test_splits_classes_and_dynamically_padded_batches(text_tasks, tiny_text_model):
    dm = _module(text_tasks, tokenizer=str(tiny_text_model))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.class_names == ["negative", "positive"]
    assert len(dm.train_set) == 8 * 12 and len(dm.val_set) == 8 * 3 and len(dm.test_set) == 32
    item, label = dm.train_set[0]
    assert set(item) == {"input_ids", "token_type_ids", "attention_mask"}
    assert item["input_ids"].dtype == torch.long and label in (0, 1)
    for inputs, labels in dm.train_dataloader():
        lengths = inputs["attention_mask"].sum(1)
        assert inputs["input_ids"].shape == (len(labels), int(lengths.max()))  # dynamic
        assert inputs["input_ids"][inputs["attention_mask"] == 0].eq(0).all()  # [PAD] = 0
        assert labels.dtype == torch.long
    # the same sentence gets the same ids in every split (one tokenizer, one vocabulary)
    text = read_tsv(text_tasks / "sentiment" / "test.tsv")
    assert len(text) == 32 and {label for label, _ in text} == {"negative", "positive"}
    assert len(dm.predict_dataloader()) == 4


def test_without_val_file_a_seeded_stratified_part_of_train_is_held_out(
    text_tasks, tiny_text_model
):
    def split(seed):
        dm = _module(text_tasks, "question", 3, str(tiny_text_model), seed=seed, val_fraction=0.25)
        dm.setup("fit")
        return [tuple(x["input_ids"].tolist()) for x, _ in dm.val_set], dm

    val, dm = split(0)
    assert len(dm.train_set) + len(dm.val_set) == 6 * 12
    assert len(dm.val_set) == 18
    assert sorted(dm.val_set.targets) == [0] * 6 + [1] * 6 + [2] * 6  # stratified
    assert val == split(0)[0] and val != split(1)[0]


def test_tokenizer_comes_from_the_backbone_when_the_config_leaves_it_open(
    tmp_path, text_tasks, tiny_text_model
):
    dm = _module(text_tasks, max_length=None)
    with pytest.raises(DataError, match="no tokenizer"):
        dm.setup("fit")
    dm.adopt_backbone_config({"tokenizer": str(tiny_text_model), "max_length": 4})
    dm.setup("fit")
    assert dm.tokenizer == str(tiny_text_model) and dm.max_length == 4
    assert max(len(x["input_ids"]) for x, _ in dm.train_set) == 4  # truncated
    elsewhere = str(tmp_path)  # an empty folder: no tokenizer there (and no download tried)
    given = _module(text_tasks, tokenizer=elsewhere)
    given.adopt_backbone_config({"tokenizer": str(tiny_text_model)})
    assert given.tokenizer == elsewhere  # the config's own choice wins
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        given.setup("fit")


def test_bad_files_are_clear_errors(tmp_path, text_tasks, tiny_text_model):
    with pytest.raises(DataError, match="train.tsv not found"):
        _module(tmp_path, tokenizer=str(tiny_text_model)).prepare_data()
    wrong = _module(text_tasks, num_classes=3, tokenizer=str(tiny_text_model))
    with pytest.raises(DataError, match="num_classes=3 but .* has 2 classes"):
        wrong.setup("fit")
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train.tsv").write_text("label\ttext\npos\tgood movie\nneg\tbad movie\n")
    (folder / "test.tsv").write_text("pos\tgood\nmaybe\tso so\n")
    dm = TextDataModule("broken", 2, tmp_path, "broken", tokenizer=str(tiny_text_model))
    dm.setup("fit")
    # one sentence per class: each stays in train, so there is no val split to validate on
    assert len(dm.train_set) == 2 and dm.val_set is None and dm.val_dataloader() == []
    with pytest.raises(DataError, match="labels that train.tsv does not: \\['maybe'\\]"):
        dm.setup("test")
    (folder / "test.tsv").write_text("pos good movie\n")
    with pytest.raises(DataError, match="test.tsv:1: no tab"):
        read_tsv(folder / "test.tsv")


def test_a_tab_inside_the_sentence_stays_part_of_it(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("label\ttext\nA\tone\ttwo\n\nB\tthree\n")
    assert read_tsv(path) == [("A", "one\ttwo"), ("B", "three")]


def test_batches_of_different_lengths_join_padded():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    b = {"input_ids": torch.tensor([[8], [9]]), "attention_mask": torch.tensor([[1], [1]])}
    joined = concat_inputs([a, b], {"input_ids": 3})
    assert joined["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3], [9, 3, 3]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert num_inputs(joined) == 3
    assert select_inputs(joined, [2])["input_ids"].tolist() == [[9, 3, 3]]
    images = torch.zeros(2, 3, 4, 4)
    assert concat_inputs([images, images]).shape == (4, 3, 4, 4) and num_inputs(images) == 2


def test_data_classes_pick_and_order_the_labels(text_tasks, tiny_text_model):
    """``data.classes``: a subset of train.tsv's labels in the given order (the ids), or an
    error that names what is missing; the rule the image folders share (``adopt_classes``)."""
    dm = _module(text_tasks, tokenizer=str(tiny_text_model), classes=["positive", "negative"])
    dm.setup("fit")
    assert dm.class_names == ["positive", "negative"]
    assert dm.class_to_idx == {"positive": 0, "negative": 1}
    bad = _module(text_tasks, tokenizer=str(tiny_text_model), classes=["positive", "neutral"])
    with pytest.raises(DataError, match=r"data.classes \['neutral'\] are not in .*train.tsv"):
        bad.setup("fit")
