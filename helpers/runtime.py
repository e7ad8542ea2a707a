"""Where the book runs: device choice, seeding, network detection, output folders.

Everything that depends on the machine (GPU or not, online or not, where files go) is decided here once,
so that chapters and the command line behave the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import random
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Hosts the pretrained-weight loaders need; if none answers, the book is offline.
_WEIGHT_HOSTS = (("download.pytorch.org", 443), ("huggingface.co", 443))


#: The ``--device`` values the book understands (``cuda:N``: the N-th GPU; ``mps``: Apple GPUs; ``xpu``: Intel
#: GPUs); :func:`resolve_device` says which of them this machine has when one is asked for and missing.
VALID_DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps", "xpu", "xpu:N")


def _accelerators() -> dict[str, tuple[bool, int]]:
    """Device type -> (available here, how many), for the accelerators :data:`VALID_DEVICES` names."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    xpu_ok = bool(xpu is not None and xpu.is_available())
    return {
        "cuda": (torch.cuda.is_available(), torch.cuda.device_count() if torch.cuda.is_available() else 0),
        "mps": (bool(mps is not None and mps.is_available()), 1),
        "xpu": (xpu_ok, xpu.device_count() if xpu is not None and xpu_ok else 0),
    }


def available_devices() -> list[str]:
    """The ``--device`` values that work on this machine: auto, cpu, then each accelerator present."""
    found = ["auto", "cpu"]
    for kind, (ok, count) in _accelerators().items():
        if ok:
            found += [kind] + ([f"{kind}:{i}" for i in range(count)] if kind != "mps" else [])
    return found


def resolve_device(device: str = "auto") -> torch.device:
    """Turn the chapters' ``device`` parameter into a torch device.

    ``"auto"`` picks CUDA when available, else CPU. Otherwise one of :data:`VALID_DEVICES` that this machine
    has (``"meta"`` is accepted too, for shape-only work); anything else raises a one-line ``ValueError`` that
    lists the valid values and the ones available here.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = f"available here: {', '.join(available_devices())}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(VALID_DEVICES)} ({here})") from err
    if resolved.type in ("cpu", "meta"):
        return resolved
    accelerators = _accelerators()
    if resolved.type not in accelerators:
        raise ValueError(f"unsupported device {device!r}; valid: {', '.join(VALID_DEVICES)} ({here})")
    ok, count = accelerators[resolved.type]
    if not ok:
        raise ValueError(f"device {device!r} asked for, but this machine or torch build has no {resolved.type}; {here}")
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device {device!r} asked for, but there are {count} {resolved.type} device(s); {here}")
    return resolved


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


#: The longest the network probe may take, name resolution included (seconds).
NETWORK_TIMEOUT_S = 2.0


def offline_forced() -> bool:
    """True when ``COLLISIONS_OFFLINE`` is set to 1 (or true/yes/on): no network probe, no download."""
    return os.environ.get("COLLISIONS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _probe(host: str, port: int, timeout_s: float, answers: queue.SimpleQueue[bool]) -> None:
    """Put whether ``host:port`` accepts a TCP connection into ``answers``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            answers.put(True)
    except OSError:
        answers.put(False)


@functools.cache
def network_available(timeout_s: float = NETWORK_TIMEOUT_S) -> bool:
    """True when one of the weight hosts accepts a TCP connection (checked once per process).

    Each host is probed in its own daemon thread and the answer is awaited ``timeout_s`` in all: a hanging name
    resolution (``getaddrinfo`` has no timeout of its own) makes the answer False after ``timeout_s``, never a
    hang. ``COLLISIONS_OFFLINE=1`` (the command line's ``--offline``) answers False without probing; after
    changing it inside a process, call ``network_available.cache_clear()``.
    """
    if offline_forced():
        return False
    answers: queue.SimpleQueue[bool] = queue.SimpleQueue()
    for host, port in _WEIGHT_HOSTS:
        threading.Thread(target=_probe, args=(host, port, timeout_s, answers), daemon=True, name="net-probe").start()
    deadline = time.monotonic() + timeout_s
    for _ in _WEIGHT_HOSTS:
        try:
            if answers.get(timeout=max(0.0, deadline - time.monotonic())):
                return True
        except queue.Empty:
            return False
    return False


def ensure_hub_mode() -> None:
    """Put the Hugging Face hub (used by timm and smp) offline when there is no network.

    Without this, timm retries the hub for about a minute before giving up on each model.
    """
    if not network_available():
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:  # huggingface_hub reads the variable at import time; refresh it if already imported
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = True
        except ImportError:
            pass


def repo_root() -> Path:
    """The repository root (parent of the ``helpers`` package) when installed in develop mode."""
    return Path(__file__).resolve().parent.parent


def output_root() -> Path:
    """Where chapters write ``figures/`` and ``results/``.

    ``COLLISIONS_OUT`` overrides it (``make test`` sends its quick runs to a scratch folder so that the
    book's real figures are never overwritten by quick ones); otherwise the repository root, or the
    current folder when ``helpers`` was installed from a wheel (Colab).
    """
    env = os.environ.get("COLLISIONS_OUT")
    if env:
        return Path(env).resolve()
    root = repo_root()
    return root if (root / "_toc.yml").exists() else Path.cwd()


def figures_dir() -> Path:
    path = output_root() / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir() -> Path:
    path = output_root() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Cache for expensive, deterministic work (trained MNIST models, audits); ``COLLISIONS_CACHE`` overrides."""
    env = os.environ.get("COLLISIONS_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "collisions-book"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Write a file so that readers see either the old file or the complete new one, never half of it.

    ``write(tmp)`` writes to a unique temporary file in the same folder (so concurrent writers do not share one),
    which is flushed to disk and then renamed over ``path``. On any error the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_cache(path: Path, payload: Any) -> Path:
    """Write ``payload`` (JSON-ready) to ``path`` atomically, inside an envelope that carries its SHA-256.

    :func:`read_json_cache` recomputes the hash, so a truncated, garbled or hand-edited file is detected.
    """
    text = json.dumps(payload, sort_keys=True, allow_nan=False)
    envelope = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "payload": text}
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(envelope)))


def write_cache_or_warn(path: Path, write: Callable[[], object]) -> bool:
    """Run ``write()`` (a cache write for ``path``); a failed one (full disk, crash) costs only the cache: one line
    on stderr and False, and the caller uses its result uncached."""
    try:
        write()
    except OSError as err:
        print(f"[cache] {path.name}: not written ({err}); the result is used uncached", file=sys.stderr, flush=True)
        return False
    return True


def discard_cache(path: Path, why: str) -> None:
    """Remove a cache file that failed verification and say so in one line on stderr (it will be recomputed)."""
    print(f"[cache] {path.name}: {why}; discarded, recomputing", file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)


def read_json_cache(path: Path) -> Any | None:
    """The payload written by :func:`write_json_cache`, or ``None`` when the file is missing or fails
    verification (not JSON, not an envelope, hash mismatch); a failing file is discarded (:func:`discard_cache`)."""
    if not path.exists():
        return None
    try:
        envelope = json.loads(path.read_bytes())
        text = envelope["payload"]
        if hashlib.sha256(text.encode()).hexdigest() != envelope["sha256"]:
            discard_cache(path, "content does not match its hash")
            return None
        return json.loads(text)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        discard_cache(path, "unreadable (truncated or not a cache file)")
        return None
