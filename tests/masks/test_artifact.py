import copy
import os

import pytest
import torch
import torchvision
from torch import nn

from piggyback.backbones import remove_classifier
from piggyback.formats import (
    ArtifactError,
    bn_state_dict,
    fingerprint,
    load_artifact,
    save_artifact,
)
from piggyback.methods import apply_artifact, extract_artifact
from piggyback.nn import get_masks, mask_model, masked_weights, reset_masks


def _backbone(seed=0):
    torch.manual_seed(seed)
    model, width = remove_classifier(torchvision.models.resnet18(weights=None))
    return mask_model(model, mask_init="uniform").eval(), width


@pytest.fixture
def trained(tmp_path):
    backbone, width = _backbone()
    head = nn.Linear(width, 5)
    artifact = extract_artifact(
        backbone,
        head,
        task="demo",
        backbone_name="resnet18",
        class_names=list("abcde"),
        config={"lr": 1e-4},
        metrics={"test/acc": 0.5},
    )
    path = save_artifact(artifact, tmp_path / "demo.safetensors")
    return backbone, head, path


def _predict(backbone, head, x):
    with torch.no_grad():
        return head(backbone(x))


def test_round_trip_gives_bit_identical_predictions(trained):
    backbone, head, path = trained
    x = torch.randn(3, 3, 64, 64)
    expected = _predict(backbone, head, x)
    fresh, _ = _backbone()  # same pretrained weights, other masks
    reset_masks(fresh)
    assert not torch.equal(_predict(fresh, head, x), expected)
    loaded = load_artifact(path)
    assert loaded.task == "demo" and loaded.num_classes == 5 and loaded.class_names == list("abcde")
    assert loaded.config == {"lr": 1e-4} and loaded.metrics == {"test/acc": 0.5}
    assert loaded.fingerprint == fingerprint(backbone)
    assert loaded.num_masked_weights == sum(m.numel() for m in get_masks(backbone).values())
    new_head = apply_artifact(fresh, loaded)
    assert torch.equal(_predict(fresh, new_head, x), expected)


def test_size_is_one_bit_per_masked_weight_plus_head(trained):
    backbone, head, path = trained
    artifact = load_artifact(path)
    assert artifact.bits_per_masked_weight() <= 1.0 + 1e-3
    head_bytes = sum(t.numel() * 4 for t in head.state_dict().values())
    overhead = os.path.getsize(path) - artifact.mask_bytes() - head_bytes
    assert 0 < overhead < 16_000  # metadata + safetensors header


def test_fingerprint_mismatch_is_refused(trained):
    _, _, path = trained
    other, _ = _backbone(seed=1)
    with pytest.raises(ArtifactError, match="different weights"):
        apply_artifact(other, load_artifact(path))


def test_truncated_file_is_refused(trained, tmp_path):
    _, _, path = trained
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="truncated or corrupt|integrity"):
            load_artifact(broken)


def test_tampered_file_is_refused(trained, tmp_path):
    _, _, path = trained
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor payload
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="integrity"):
        load_artifact(tampered)


def test_not_an_artifact(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtifactError, match="not a piggyback task artifact"):
        load_artifact(plain)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "missing.safetensors")


def test_wrong_shape_mask_is_refused(trained):
    backbone, _, path = trained
    artifact = load_artifact(path)
    name = next(iter(artifact.masks))
    packed = artifact.masks[name]
    packed.shape = (packed.shape[0], packed.shape[1] * 2, *packed.shape[2:])
    with pytest.raises(ArtifactError, match="shape"):
        apply_artifact(backbone, artifact)


def test_save_never_overwrites_silently(trained):
    backbone, head, path = trained
    before = path.read_bytes()
    artifact = extract_artifact(backbone, nn.Linear(512, 3), task="other", backbone_name="resnet18")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_artifact(artifact, path)
    assert path.read_bytes() == before
    save_artifact(artifact, path, overwrite=True)
    assert load_artifact(path).task == "other"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_bn_state_travels_with_the_task(tmp_path):
    backbone, width = _backbone()
    pretrained_bn = bn_state_dict(backbone)
    tuned = copy.deepcopy(backbone)
    for _, module in tuned.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.add_(0.5)
            module.weight.data.mul_(1.5)
    artifact = extract_artifact(
        tuned,
        nn.Linear(width, 2),
        task="bn",
        backbone_name="r18",
        include_bn=True,
        backbone_fingerprint=fingerprint(backbone),
    )
    path = save_artifact(artifact, tmp_path / "bn.safetensors")
    x = torch.randn(2, 3, 32, 32)
    head = apply_artifact(backbone, load_artifact(path))
    assert torch.equal(_predict(backbone, head, x), _predict(tuned, head, x))
    # a frozen-BN task restores the shared statistics
    plain = extract_artifact(
        copy.deepcopy(backbone), nn.Linear(width, 2), task="plain", backbone_name="r18"
    )
    plain.fingerprint = fingerprint(backbone, bn_state=pretrained_bn)  # the pretrained net
    apply_artifact(backbone, plain, pretrained_bn=pretrained_bn)
    assert torch.equal(backbone.bn1.running_mean, pretrained_bn["bn1.running_mean"])


def test_ternary_and_compressible_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone = mask_model(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 6)),
        threshold_fn="ternarizer",
        mask_init="uniform",
    )
    head = nn.Linear(6, 2)
    path = save_artifact(
        extract_artifact(backbone, head, task="t", backbone_name="toy"), tmp_path / "t.safetensors"
    )
    loaded = load_artifact(path)
    assert {m.kind for m in loaded.masks.values()} == {"ternary"}
    expected = get_masks(backbone)
    for _, layer in masked_weights(backbone):
        layer.reset_mask("1s")
    apply_artifact(backbone, loaded)
    for name, mask in get_masks(backbone).items():
        assert torch.equal(mask, expected[name])


def test_same_weights_other_bn_statistics_are_refused(trained):
    """Frozen-BN tasks depend on the shared BN statistics: the fingerprint covers them."""
    backbone, _, path = trained
    other = copy.deepcopy(backbone)
    other.bn1.running_var.mul_(4.0)  # same conv/linear weights, other statistics
    with pytest.raises(ArtifactError, match="different weights"):
        apply_artifact(other, load_artifact(path))
    apply_artifact(backbone, load_artifact(path))  # the original still fits


def test_format_1_artifacts_still_load(trained, tmp_path):
    """Artifacts written before masks were named by parameter (format 1) keep working."""
    from piggyback.formats import (
        ARTIFACT_FORMAT,
        artifact_meta,
        artifact_tensors,
        legacy_fingerprint,
        write_checked_file,
    )

    backbone, head, path = trained
    current = load_artifact(path)
    old = copy.copy(current)
    old.masks = {name.removesuffix(".weight"): m for name, m in current.masks.items()}
    old.fingerprint = legacy_fingerprint(backbone)
    old_path = write_checked_file(
        tmp_path / "v1.safetensors",
        artifact_tensors(old),
        artifact_meta(old),
        file_format=ARTIFACT_FORMAT,
        version=1,
    )
    loaded = load_artifact(old_path)
    assert set(loaded.masks) == set(current.masks)  # renamed to parameter names
    x = torch.randn(2, 3, 64, 64)
    expected = _predict(backbone, head, x)
    fresh, _ = _backbone()
    reset_masks(fresh)
    assert torch.equal(_predict(fresh, apply_artifact(fresh, loaded), x), expected)
    other = copy.deepcopy(fresh)
    next(m for _, m in masked_weights(other)).weight.data.add_(1.0)
    with pytest.raises(ArtifactError, match="different weights"):
        apply_artifact(other, loaded)
