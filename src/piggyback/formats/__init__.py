"""Task artifact and bundle files: read, write, validate, fingerprint. Knows no method.

Layers: ``checked_file`` (the safetensors container with digest) <- ``packed`` (one mask as
stored) and ``state`` (backbone fingerprint, BN state) <- ``artifact`` (one task) <- ``bundle``
(one backbone and many tasks). Applying an artifact is the method's job
(``piggyback.methods.apply_artifact``).
"""

from piggyback.formats.artifact import (
    ARTIFACT_FORMAT,
    FORMAT_VERSION,
    ArtifactParts,
    TaskArtifact,
    artifact_from_model,
    artifact_from_parts,
    artifact_meta,
    artifact_tensors,
    check_fingerprint,
    fingerprint_for,
    load_artifact,
    save_artifact,
    verify_backbone,
)
from piggyback.formats.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, read_bundle, write_bundle
from piggyback.formats.checked_file import ArtifactError, read_checked_file, write_checked_file
from piggyback.formats.packed import (
    MASK_ENCODINGS,
    PackedMask,
    canonical_encoding,
    load_masks,
    pack_model_masks,
)
from piggyback.formats.state import (
    FINGERPRINT_SCHEME,
    bn_state_dict,
    fingerprint,
    legacy_fingerprint,
    load_bn_state,
)

__all__ = [
    "ARTIFACT_FORMAT",
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "FINGERPRINT_SCHEME",
    "FORMAT_VERSION",
    "MASK_ENCODINGS",
    "ArtifactError",
    "ArtifactParts",
    "PackedMask",
    "TaskArtifact",
    "artifact_from_model",
    "artifact_from_parts",
    "artifact_meta",
    "artifact_tensors",
    "bn_state_dict",
    "canonical_encoding",
    "check_fingerprint",
    "fingerprint",
    "fingerprint_for",
    "legacy_fingerprint",
    "load_artifact",
    "load_bn_state",
    "load_masks",
    "pack_model_masks",
    "read_bundle",
    "read_checked_file",
    "save_artifact",
    "verify_backbone",
    "write_bundle",
    "write_checked_file",
]
