"""Where model files come from: a local path, or `hf://owner/repo/path/in/repo@revision`.

Remote files go through huggingface_hub's cache, so HF_HOME, HF_HUB_CACHE and
HF_HUB_OFFLINE behave as they do for every other hub user. Local paths never
touch the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HF_PREFIX = "hf://"


class ModelFileError(FileNotFoundError):
    """A model file (weights, tokenizer, config, voice) could not be found or fetched."""


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo_id}/{self.filename}{rev}"


def parse_hub_path(spec: str) -> HubFile:
    """Split `hf://owner/repo/some/file.ext@rev` into its parts."""
    rest = spec.removeprefix(HF_PREFIX)
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"malformed hub path {spec!r}: expected hf://owner/repo/path/to/file[@revision]")
    return HubFile("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def is_hub_path(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def resolve_file(spec: str | Path, what: str, relative_to: Path | None = None) -> Path:
    """Return a local path for `spec`, downloading hub files into the hub cache.

    `what` names the file in error messages ("weights", "tokenizer", ...).
    Relative local paths are taken relative to `relative_to` when given.
    """
    if is_hub_path(spec):
        return _download(parse_hub_path(str(spec)), what)
    path = Path(spec).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    if not path.is_file():
        raise ModelFileError(f"{what} file not found: {path}")
    return path


def _download(hub_file: HubFile, what: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(hub_file.repo_id, hub_file.filename, revision=hub_file.revision)
        )
    except LocalEntryNotFoundError as exc:
        raise ModelFileError(
            f"{what} {hub_file} is not in the Hugging Face cache and the hub cannot be reached "
            f"(offline mode or no network); download it once with network access, or pass a "
            f"local file instead"
        ) from exc
    except Exception as exc:  # gated repos, missing files, HTTP errors
        raise ModelFileError(
            f"could not fetch {what} {hub_file}: {type(exc).__name__}: {exc}. "
            f"Log in with `hf auth login` if the repository is gated, or pass a local file"
        ) from exc
