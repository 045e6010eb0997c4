"""Resolving a model argument (a local folder or a Hugging Face hub id) to a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from effllm.core.errors import CheckpointError

# Files a Llama-family checkpoint needs; weights are matched by pattern.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id downloaded (or found) in the Hugging Face cache.

    Honours HF_HUB_OFFLINE: offline, only the cache is consulted and a miss is a clear error.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"{text} is a file; pass the folder that holds config.json and the weights")
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "")
    if looks_local or not text:
        raise CheckpointError(f"model folder {text!r} does not exist; pass a checkpoint folder or a hub id")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except HFValidationError:
        raise CheckpointError(f"{repo_id!r} is neither an existing folder nor a valid hub id") from None
    except Exception as e:  # network errors, missing repos and cache misses come in many types
        if offline:
            raise CheckpointError(
                f"{repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it once online or pass a local folder"
            ) from None
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
            "check the id and the network, or pass a local folder"
        ) from None


def checkpoint_file(folder: Path, name: str) -> Path:
    """`folder / name`, refused unless it stays inside the checkpoint: a name an index or config file gives
    (a shard, a template) must not climb out with `..`, be absolute, or be a symlink that resolves elsewhere.

    A Hugging Face cache snapshot links its files to the repo's `blobs/`; those links are allowed.
    """
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{folder}: refusing {name!r}, a file outside the checkpoint folder")
    path = folder / name
    try:
        target = path.resolve(strict=False)
        root = folder.resolve(strict=True)
    except (RuntimeError, OSError) as e:  # a symlink loop, an unreadable folder
        raise CheckpointError(f"{path} cannot be resolved ({e}); fix the checkpoint's links") from None
    roots = [root]
    if root.parent.name == "snapshots":  # huggingface_hub's cache: snapshots/<rev>/file -> ../../blobs/<hash>
        roots.append(root.parent.parent / "blobs")
    if not any(target == r or r in target.parents for r in roots):
        raise CheckpointError(f"{path} points outside the checkpoint folder ({target}); refusing to read it")
    return path
