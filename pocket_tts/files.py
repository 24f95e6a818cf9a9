"""Where model files come from: a local path, or `hf://owner/repo/path/in/repo@revision`.

Remote files go through huggingface_hub's cache, so HF_HOME, HF_HUB_CACHE and
HF_HUB_OFFLINE behave as they do for every other hub user. Local paths never
touch the network.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

HF_PREFIX = "hf://"
# A file missing from the cache is fetched only if the hub's host answers within this many
# seconds: without the check, huggingface_hub retries an unreachable hub for ~24 s per file.
HUB_PROBE_TIMEOUT = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


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


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the hub's host cannot be reached (name lookup or TCP connect), or None when it answers.

    Behind a proxy the host is not probed (None): only the proxy knows the way.
    """
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    address = (endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80))
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    # The name lookup has no timeout of its own: the thread bounds it.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
        return f"{address[0]}:{address[1]} did not answer within {timeout:g} s"
    error = outcome[0]
    return None if error is None else f"{address[0]}:{address[1]}: {error.strerror or error}"


def _download(hub_file: HubFile, what: str) -> Path:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    cached = try_to_load_from_cache(hub_file.repo_id, hub_file.filename, revision=hub_file.revision)
    if not constants.HF_HUB_OFFLINE and not isinstance(cached, str):
        reason = hub_unreachable_reason()
        if reason is not None:
            raise ModelFileError(
                f"{what} {hub_file} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                f"cannot be reached ({reason}); pass local files instead, or fill the cache where the hub is "
                f"reachable (HF_HUB_OFFLINE=1 then reads only the cache)"
            )
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
