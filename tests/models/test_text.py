"""Every method on a text backbone, through the Hydra app, without method code knowing it is
text (issue 34): a two-task sentence sequence on the tiny random BERT, no forgetting where the
method promises none, artifacts that a multi-task model and a bundle reproduce bit-exactly,
and task inference over text batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from piggyback.backbones import build_backbone  # noqa: E402
from piggyback.data.text import TextDataModule  # noqa: E402
from piggyback.formats import load_artifact  # noqa: E402
from piggyback.models.multitask import MultiTaskModel, load_bundle  # noqa: E402
from piggyback.train import train  # noqa: E402

TINY = (
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
    "print_table=false",
)


def _text_cfg(make_cfg, model: Path, root: Path, *overrides: str):
    return make_cfg(
        *TINY,
        "experiment=text",
        f"backbone.name={model}",
        "backbone.source=huggingface",
        "~data.tasks.subj",
        f"data.root={root}",
        "data.tasks.sst2.name=sentiment",
        "data.tasks.trec.name=question",
        "data.tasks.trec.num_classes=3",
        "data.batch_size=16",
        *overrides,
    )


# finetune: a network per task; the others share one backbone and promise no forgetting
@pytest.mark.parametrize(
    "method", ["piggyback", "ksm", "packnet", "cpg", "wsn", "hat", "finetune", "classifier_only"]
)
def test_every_method_learns_a_text_sequence(make_cfg, tiny_text_model, text_tasks, method):
    extra = ("method.compact_epochs=0",) if method == "cpg" else ()
    cfg = _text_cfg(make_cfg, tiny_text_model, text_tasks, f"method={method}", *extra)
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["tasks"]) == {"sst2", "trec"}
    assert 0.0 <= metrics["test/acc"] <= 1.0
    matrix = summary["cl"]["accuracy_matrix"]
    assert matrix[1][0] == matrix[0][0]  # the first task is untouched by learning the second
    artifact = load_artifact(out / "artifacts" / "trec.safetensors")
    assert artifact.method == cfg.method.name and artifact.num_classes == 3
    assert artifact.prototype is not None and artifact.prototype.shape == (32,)
    assert artifact.config["data"]["tasks"]["trec"]["tokenizer"] == str(tiny_text_model)
    if method in ("piggyback", "ksm"):
        assert not any("embeddings" in name for name in artifact.masks)
        assert len(artifact.masks) == 2 * 6


def test_text_tasks_ship_in_a_bundle_and_task_inference_reads_text(
    make_cfg, tiny_text_model, text_tasks, tmp_path
):
    cfg = _text_cfg(
        make_cfg,
        tiny_text_model,
        text_tasks,
        "task_inference=[oneshot,prototype]",
        "mask.embeddings=true",
        "method.lr.masks=1e-2",
        "method.lr.head=1e-2",
    )
    train(cfg)
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "metrics.json").read_text())
    block = summary["cl"]["task_inference"]
    assert set(block["strategies"]) == {"oneshot", "prototype"}
    assert block["mixed_stream"]["inputs"] == 32 + 4 * 6  # both test splits, padded together
    artifacts = [load_artifact(out / "artifacts" / f"{t}.safetensors") for t in ("sst2", "trec")]
    assert "encoder.embeddings.word_embeddings.weight" in artifacts[0].masks
    assert artifacts[0].masks["encoder.encoder.layer.0.intermediate.dense.weight"].num_weights
    built = build_backbone(str(tiny_text_model))
    model = MultiTaskModel(built.model, built.name)  # a bundle rebuilds it by that name
    for artifact in artifacts:
        model.add_task(artifact)
    dm = TextDataModule("trec", 3, text_tasks, "question", tokenizer=str(tiny_text_model))
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        logits = model(x, task="trec")
        assert logits.shape == (len(y), 3)
        shipped = load_bundle(model.save(tmp_path / "bundle.safetensors"))
        assert torch.equal(shipped(x, task="trec"), logits)
        assert torch.equal(shipped(x, task="sst2"), model(x, task="sst2"))
    assert shipped.infer_task(x, "prototype") in ("sst2", "trec")
    assert len(shipped.predict(x, "entropy")) == len(y)
    lengths = x["attention_mask"].sum(1).tolist()
    single = [({k: v[i, :n] for k, v in x.items()}, "trec") for i, n in enumerate(lengths)]
    assert model.predict_mixed(single) == logits.argmax(1).tolist()  # re-padded per batch
