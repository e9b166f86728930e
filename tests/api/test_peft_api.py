"""The PEFT-style API (issue 34): wrap any module, save/load a task, switch, merge, export.

On a tiny random BERT classifier (no download) and on a plain CNN (not Hugging Face).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from piggyback.api import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    MaskConfig,
    MaskedModel,
    get_masked_model,
)
from piggyback.formats import ArtifactError, load_artifact  # noqa: E402
from piggyback.nn import MaskingError, get_masks, masked_weights, set_masks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["query", "key", "value", "dense"]


def bert(seed: int = 0) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


IDS = torch.randint(5, 100, (6, 11), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train(model: MaskedModel, labels: list[int], steps: int = 8) -> None:
    """A few steps at a rate that flips masks, so tasks really differ."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=torch.tensor(labels)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_wrap_selects_weights_the_peft_way_and_starts_at_the_pretrained_model():
    plain = bert()
    model = get_masked_model(copy.deepcopy(plain), target_modules=TARGETS, task_name="a")
    names = model.config.masked_weights
    assert len(names) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    assert "classifier.weight" not in names  # no entry names it
    assert torch.equal(logits(model), logits(plain))  # the 1s init changes nothing
    saved = get_masked_model(
        copy.deepcopy(plain), target_modules=TARGETS, modules_to_save=["classifier"]
    )
    assert "classifier.weight" not in saved.config.masked_weights
    trainable = {n for n, p in saved.named_parameters() if p.requires_grad}
    assert {"base_model.classifier.weight", "base_model.classifier.bias"} <= trainable
    assert all(n.endswith("mask_real") or ".classifier." in n for n in trainable)
    # a regex over the whole name, exclude_modules, and embeddings on request
    regex = get_masked_model(copy.deepcopy(plain), target_modules=r".*layer\.1\..*(query|key)")
    assert [n.split(".layer.")[1] for n in regex.config.masked_weights] == [
        "1.attention.self.query.weight",
        "1.attention.self.key.weight",
    ]
    linear = get_masked_model(
        copy.deepcopy(plain), target_modules="all-linear", exclude_modules=["pooler.dense"]
    )
    assert len(linear.config.masked_weights) == 2 * 6 + 1  # the classifier, not the pooler
    assert "classifier.weight" in linear.config.masked_weights
    default = get_masked_model(copy.deepcopy(plain), embeddings=True)
    assert "bert.embeddings.word_embeddings.weight" in default.config.masked_weights
    assert torch.equal(logits(default), logits(plain))
    with pytest.raises(MaskingError, match=r"\['querry'\] match no"):
        get_masked_model(copy.deepcopy(plain), target_modules=["querry", "key"])
    with pytest.raises(MaskingError, match="a container"):
        get_masked_model(copy.deepcopy(plain), target_modules=["attention"])


def test_trainable_counts_print_like_peft(capsys):
    model = get_masked_model(bert(), MaskConfig(target_modules=["query"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * 32 * 32
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert re.fullmatch(
        r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+\n", out
    )


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    model = get_masked_model(
        bert(), target_modules=TARGETS, modules_to_save=["classifier"], task_name="sst2"
    )
    _train(model, [0, 1, 2, 0, 1, 2])
    assert any((m == 0).any() for m in get_masks(model.base_model).values())  # masks moved
    expected = logits(model)
    folder = model.save_pretrained(tmp_path / "sst2")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["task_name"] == "sst2" and config["target_modules"] == TARGETS
    artifact = load_artifact(folder / WEIGHTS_NAME)  # the project's checked task file
    assert artifact.bits_per_masked_weight() == pytest.approx(1.0, abs=0.01)
    assert set(artifact.weights) == {"classifier.weight", "classifier.bias"}
    loaded = MaskedModel.from_pretrained(bert(), folder)
    assert loaded.active_task == "sst2" and loaded.tasks == ["sst2"]
    assert torch.equal(logits(loaded), expected)
    for name, mask in get_masks(model.base_model).items():
        assert torch.equal(get_masks(loaded.base_model)[name], mask)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference unless asked
    trainable = MaskedModel.from_pretrained(bert(), folder, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0
    # other base weights are refused: masks on them would be meaningless
    with pytest.raises(ArtifactError, match="other base weights"):
        MaskedModel.from_pretrained(bert(seed=1), folder)


def test_two_tasks_on_one_base_model_switch_bit_exactly_and_never_forget(tmp_path):
    model = get_masked_model(
        bert(), target_modules=TARGETS, modules_to_save=["classifier"], task_name="a"
    )
    _train(model, [0, 1, 2, 0, 1, 2])
    first = logits(model)
    model.save_pretrained(tmp_path / "a")
    model.add_task("b")
    assert model.active_task == "b" and model.tasks == ["a", "b"]
    assert torch.equal(logits(model), logits(bert()))  # fresh masks, original classifier
    _train(model, [2, 2, 1, 1, 0, 0])
    second = logits(model)
    assert not torch.equal(first, second)
    model.save_pretrained(tmp_path / "b")
    for _ in range(2):  # back and forth, bit for bit: learning b forgot nothing of a
        model.set_task("a")
        assert torch.equal(logits(model), first)
        model.set_task("b")
        assert torch.equal(logits(model), second)
    with model.disable_masks():
        assert torch.equal(logits(model), logits(bert()))  # the pretrained network
    assert torch.equal(logits(model), second)
    # both tasks from their folders onto one fresh base model
    served = MaskedModel.from_pretrained(bert(), tmp_path / "a")
    assert served.load_task(tmp_path / "b") == "b" and served.active_task == "a"
    assert torch.equal(logits(served), first)
    served.set_task("b")
    assert torch.equal(logits(served), second)
    other = get_masked_model(bert(), target_modules=["query"])
    with pytest.raises(ArtifactError, match="other weights"):
        other.load_task(tmp_path / "a")
    served.delete_task("a")
    assert served.tasks == ["b"] and torch.equal(logits(served), second)


def test_merge_and_unload_export_plain_weights(tmp_path):
    model = get_masked_model(bert(), target_modules=TARGETS, modules_to_save=["classifier"])
    masks = {
        name: (torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) > 0.2).float()
        for name, mask in get_masks(model.base_model).items()
    }
    set_masks(model.base_model, masks)
    expected = logits(model)
    copy_ = model.merge_and_unload(inplace=False)
    assert type(copy_) is transformers.BertForSequenceClassification
    assert not list(masked_weights(copy_)) and model.tasks == ["default"]
    torch.testing.assert_close(logits(copy_), expected, rtol=1e-5, atol=1e-6)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(copy_.state_dict()[name] == 0, masks[name] == 0)
    merged = model.merge_and_unload()  # PEFT's behaviour: in place
    assert merged is model.base_model and not any("mask" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-6)
    pristine = get_masked_model(bert(), target_modules=TARGETS)
    set_masks(pristine.base_model, masks)
    assert torch.equal(logits(pristine.unload()), logits(bert()))


def test_any_module_works_and_shared_batchnorm_stays_frozen(tmp_path):
    x = torch.rand(4, 3, 9, 9)
    model = get_masked_model(cnn(), modules_to_save=["5"], task_name="cnn")
    assert model.config.masked_weights == ["0.weight"]
    model.train()
    assert not model.base_model[1].training  # its statistics belong to every task
    before = model.base_model[1].running_mean.clone()
    model(x)
    assert torch.equal(model.base_model[1].running_mean, before)
    model.eval()
    set_masks(model.base_model, {"0.weight": (torch.rand(8, 3, 3, 3) > 0.5).float()})
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "cnn")
    loaded = MaskedModel.from_pretrained(cnn(), tmp_path / "cnn")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_readme_snippet_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use it from Python (PEFT-style)", 1)[1].split("\n## ", 1)[0]
    assert len(section.strip().splitlines()) <= 19  # with the heading: at most 20 lines
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    served, plain = namespace["served"], namespace["plain"]
    assert served.tasks == []  # merged in place: the wrapper is done
    assert not any("mask" in k for k in plain.state_dict())
    assert (tmp_path / "tasks" / "sst2" / WEIGHTS_NAME).is_file()
    with torch.no_grad():
        assert plain(input_ids=IDS[:, :5]).logits.shape == (6, 2)
