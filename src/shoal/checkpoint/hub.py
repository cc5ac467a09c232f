"""Fetch a checkpoint from the Hugging Face hub into the local cache.

Only the files a merge needs are downloaded: safetensors weights and index, config,
generation config, tokenizer and chat template. Pickle weights are fetched only when the
user allowed them and the repository has no safetensors weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from shoal.errors import CheckpointError

# "name" or "owner/name": letters, digits, '-', '_', '.'; no leading '.', no '..' or '--'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".gguf")

SUPPORT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
    "additional_chat_templates/*",
    "preprocessor_config.json",
    "processor_config.json",
]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def looks_like_hub_id(source: str) -> bool:
    """Whether ``source`` could name a hub repository (``owner/name`` or a bare ``name``)."""
    return (
        bool(_HUB_ID.match(source))
        and ".." not in source
        and "--" not in source
        and not source.lower().endswith(_WEIGHT_SUFFIXES)
    )


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo or revision, offline mode: all the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        at = f" at revision {revision!r}" if revision else ""
        raise CheckpointError(
            f"{repo_id!r} is not a local file or folder, and downloading it from the Hugging Face hub{at} "
            f"failed: {reason}"
        ) from exc


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def download_checkpoint(repo_id: str, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """Download the merge-relevant files of ``repo_id`` and return the local snapshot folder."""
    folder = _snapshot(repo_id, revision, SAFETENSORS_PATTERNS + SUPPORT_PATTERNS)
    if _has_safetensors(folder):
        return folder
    if not allow_pickle:
        raise CheckpointError(
            f"{repo_id!r} (downloaded to {folder}) has no .safetensors weights; if it ships pickle "
            f"weights (pytorch_model.bin), pass allow_pickle=True to load them with torch.load(weights_only=True)"
        )
    return _snapshot(repo_id, revision, PICKLE_PATTERNS + SUPPORT_PATTERNS)


def hub_cache_root(snapshot: Path) -> Path:
    """The repository cache folder holding ``snapshot``: its shards may link into ``../../blobs``."""
    if snapshot.parent.name == "snapshots":
        return snapshot.parent.parent
    return snapshot
