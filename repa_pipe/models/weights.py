"""Shared weight-resolution helpers for `models/`: local paths, the Hugging Face cache, a fast hub check.

Policy: weights come from a local file/folder given on the command line, or from the local Hugging Face cache, or
-- only when the hub answers quickly -- from a download. On a machine without network a missing weight is a
`MissingWeightsError` naming the option to pass, raised within a few seconds: no hang, no retry loop.

How "the hub is reachable" is decided (`hub_reachable`), cheapest first:
1. `HF_HUB_OFFLINE` (read from the environment at call time, and huggingface_hub's own constant) -> offline.
2. Otherwise one TCP connect to the hub endpoint (`HF_ENDPOINT`, default huggingface.co:443) -- or to the
   HTTPS proxy when `HTTPS_PROXY`/`https_proxy` is set -- in a daemon thread joined with a timeout
   (default 2.5 s, `REPA_HUB_TIMEOUT` overrides), so neither a slow DNS resolver nor a black-holed route can
   make it wait longer.

This module does no file I/O except reading weights.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlparse

import torch

from repa_pipe.pipeline.errors import ConfigError, MissingWeightsError

DEFAULT_HUB_TIMEOUT = 2.5
_TRUE = {"1", "true", "yes", "on"}

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """torch.float32/bfloat16/float16 or one of 'fp32', 'bf16', 'fp16' (and long names) -> torch.dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")


# ----------------------------------------------------------------------------------------------- the hub
def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (checked now, not at import) or huggingface_hub says offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except Exception:  # pragma: no cover - huggingface_hub is a hard dependency
        return False


def hub_endpoint() -> str:
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_cache_dir() -> str:
    """The HF hub cache folder, read from the environment now (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _probe_address(url: str) -> tuple[str, int] | None:
    scheme = urlparse(url).scheme or "https"
    proxy = None
    if scheme == "https":
        proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    else:
        proxy = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy")
    target = urlparse(proxy if proxy else url)
    if proxy and not target.hostname:  # "host:port" without a scheme
        target = urlparse("http://" + proxy)
    if not target.hostname:
        return None
    port = target.port or (443 if target.scheme == "https" else 80)
    return target.hostname, port


def hub_reachable(timeout: float | None = None, endpoint: str | None = None) -> bool:
    """Quick yes/no: can the hub (or the configured HTTPS proxy) be reached with one TCP connect?

    Never blocks longer than `timeout` seconds (default 2.5, env REPA_HUB_TIMEOUT): DNS lookup and connect
    run in a daemon thread that is abandoned when the time is up.
    """
    if hub_offline():
        return False
    if timeout is None:
        try:
            timeout = float(os.environ.get("REPA_HUB_TIMEOUT", DEFAULT_HUB_TIMEOUT))
        except ValueError:
            timeout = DEFAULT_HUB_TIMEOUT
    addr = _probe_address(endpoint or hub_endpoint())
    if addr is None:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            conn = socket.create_connection(addr, timeout=timeout)
            conn.close()
            result.append(True)
        except Exception:
            result.append(False)

    thread = threading.Thread(target=probe, name="repa-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _missing(what: str, hub_id: str, option: str, reason: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"{what}: weights '{hub_id}' are not in the local Hugging Face cache ({hub_cache_dir()}) and {reason}; "
        f"pass {option} (a local copy of the weights), or pre-fetch '{hub_id}' into the cache on a machine "
        f"with network"
    )


def fetch_from_hub(
    what: str,
    hub_id: str,
    option: str,
    local_loader: Callable[[], Any],
    remote_loader: Callable[[], Any],
) -> Any:
    """Try `local_loader()` (cache only); if it fails and the hub answers quickly, `remote_loader()`.

    Any failure ends as MissingWeightsError naming `option` and `hub_id`.
    """
    try:
        return local_loader()
    except (KeyboardInterrupt, MissingWeightsError):
        raise
    except Exception as local_err:  # not cached (or partially cached)
        cause: BaseException = local_err
    if hub_offline():
        raise _missing(what, hub_id, option, "HF_HUB_OFFLINE is set") from cause
    if not hub_reachable():
        raise _missing(what, hub_id, option, f"the hub ({hub_endpoint()}) cannot be reached") from cause
    try:
        return remote_loader()
    except KeyboardInterrupt:
        raise
    except Exception as err:
        raise _missing(what, hub_id, option, f"downloading failed ({type(err).__name__}: {err})") from err


def hub_file(what: str, hub_id: str, filenames: Sequence[str], option: str) -> Path:
    """Local path of the first of `filenames` in hub repo `hub_id` (cache first, then a quick download)."""
    from huggingface_hub import hf_hub_download

    cache_dir = hub_cache_dir()

    def first(local_only: bool) -> Path:
        errors = []
        for name in filenames:
            try:
                return Path(hf_hub_download(hub_id, name, cache_dir=cache_dir, local_files_only=local_only))
            except Exception as err:  # try the next file name
                errors.append(f"{name}: {type(err).__name__}")
        raise FileNotFoundError(f"none of {list(filenames)} in {hub_id} ({'; '.join(errors)})")

    return fetch_from_hub(what, hub_id, option, lambda: first(True), lambda: first(False))


# ------------------------------------------------------------------------------------------ local files
def local_path(weights: str | os.PathLike, option: str, what: str) -> Path:
    """The given weights path, which must exist (else MissingWeightsError naming the path and option)."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise MissingWeightsError(f"{what}: {option} {weights} does not exist")
    return path.resolve()


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin")


def read_state_dict(path: str | os.PathLike, option: str = "--encoder-weights") -> Mapping[str, Any]:
    """Read a weights file on CPU: `.safetensors` via safetensors, anything else via torch.load(weights_only=True).

    A folder holding one of model.safetensors / pytorch_model.bin (a downloaded hub repo) is accepted too.
    Returns what the file holds (a state dict, or a checkpoint dict wrapping one).
    """
    path = Path(path)
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ConfigError(f"{option} {path} is a folder without any of {list(_WEIGHT_FILES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"{option} {path} cannot be read as weights ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "expected a .safetensors file or a torch.save'd state dict / checkpoint of plain tensors "
            "(TorchScript archives and pickled objects are refused: weights_only=True)"
        ) from err
