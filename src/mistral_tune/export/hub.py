"""`mistral-tune push`: a run's model or adapter, with its model card, to the Hugging Face Hub, through
huggingface_hub's own upload (create_repo, then upload_folder with the exact list of files)."""

from __future__ import annotations

import glob
from pathlib import Path

from ..errors import ConfigError, ModelError
from ..fsutil import MARKER
from .card import write_card


def push_source(path: Path, adapter: bool = False) -> Path:
    """The folder a push uploads: an adapter or model directory as it is; for a run, its merged model
    (or fully fine-tuned model/) when it has one, else (or with adapter=True) its adapter."""
    path = Path(path).expanduser()
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    parts = ("adapter",) if adapter else ("merged", "model", "adapter")
    for part in parts:
        if (path / part / "adapter_config.json").is_file() or (path / part / "config.json").is_file():
            return path / part
    raise ModelError(f"{path}: no {' or '.join(f'{p}/' for p in parts)} to push (neither a run's output_dir with "
                     "one, nor an adapter or model directory)")


def upload_files(folder: Path) -> list[str]:
    """The files a push uploads, relative to the folder (POSIX paths, sorted): all of them but our
    ownership marker and hidden files (editor and OS leftovers)."""
    folder = Path(folder)
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.name != MARKER and not any(p.startswith(".") for p in rel.parts):
            found.append(rel.as_posix())
    return sorted(found)


def upload_patterns(files: list[str]) -> list[str]:
    """upload_folder's allow_patterns that match exactly these files (fnmatch patterns: a name with [, *
    or ? in it is escaped)."""
    return [glob.escape(f) for f in files]


def hub_token(token: str | None = None) -> str:
    """The token an upload uses (given, $HF_TOKEN, or `hf auth login`'s); a clear error when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write "
                          "access); nothing was uploaded")
    return token


def push(path: Path, repo_id: str, *, private: bool = False, adapter: bool = False, token: str | None = None,
         echo=print) -> str:
    """Upload a run's model or adapter (push_source) to repo_id, its card written for that repository
    first. Everything is checked (the folder, the repository name, the token) before anything is sent.
    Returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = push_source(path, adapter)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"--repo {repo_id!r}: not a Hub repository name ({exc})") from None
    if "/" not in repo_id:
        raise ConfigError(f"--repo {repo_id!r}: name the owner too, e.g. your-name/{repo_id}")
    token = hub_token(token)
    write_card(folder, repo_id=repo_id)
    files = upload_files(folder)
    hub = HfApi(token=token)
    hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    echo(f"uploading {len(files)} files from {folder} to {repo_id}")
    commit = hub.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                               allow_patterns=upload_patterns(files),
                               commit_message=f"Upload {folder.name} with mistral-tune")
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
