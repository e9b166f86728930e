"""The PEFT-style API for people outside the Hydra app: Piggyback masks on any ``nn.Module``.

``get_masked_model(model, target_modules=...)`` wraps a model (Hugging Face or not) for a
first task; ``save_pretrained`` / ``from_pretrained`` write and read a task as a small JSON
config plus a safetensors task file; ``load_task`` / ``set_task`` hold several tasks on one
base model; ``merge_and_unload`` exports a task as plain weights. Names follow Hugging Face
PEFT where the meaning is the same (see :mod:`piggyback.api.peft` for where it differs).
"""

from piggyback.api.peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    MaskConfig,
    MaskedModel,
    get_masked_model,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "MaskConfig", "MaskedModel", "get_masked_model"]
