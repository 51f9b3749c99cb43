"""Writing outputs so that nothing is lost: stage next to the target, then rename into place.

A failure at any point leaves no half-written output, and an existing output is replaced only
when the user asked for it and only after the new one is complete. Nothing is ever written over
an input.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvfuse.errors import KvfuseError


def check_not_input(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output path that is, or contains, one of the inputs."""
    target = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or target in source.parents:
            raise KvfuseError(
                f"output {out} would overwrite the input {source}; choose another output path"
            )


@contextlib.contextmanager
def staged_directory(out: Path, *, overwrite: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty staging directory that becomes `out` when the block succeeds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KvfuseError(f"{out} exists and is not a directory; choose another output path")
    staging = _new_staging(out, overwrite, inputs)
    try:
        with _write_errors(out):
            yield staging
            _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(out: Path, *, overwrite: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a staging directory; the file written there under `out.name` becomes `out`.

    Companion files written in the staging directory (e.g. external weights) are moved next to
    `out` as well, each under its own name, refusing to replace files the user did not name.
    """
    out = Path(out)
    staging = _new_staging(out, overwrite, inputs)
    try:
        with _write_errors(out):
            yield staging
            companions = [p for p in staging.iterdir() if p.name != out.name]
            for extra in companions:
                destination = out.parent / extra.name
                check_not_input(destination, inputs)
                if destination.exists() and not overwrite:
                    raise KvfuseError(
                        f"{destination} already exists; pass --overwrite to replace it"
                    )
            for extra in companions:
                os.replace(extra, out.parent / extra.name)
            os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _new_staging(out: Path, overwrite: bool, inputs: Sequence[Path]) -> Path:
    """An empty directory beside `out` to build the output in, after the refusal checks."""
    check_not_input(out, inputs)
    if out.exists() and not overwrite:
        raise KvfuseError(
            f"{out} already exists; pass --overwrite to replace it, or choose another"
        )
    with _write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output gets normal modes
    return staging


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _write_errors(out: Path) -> Iterator[None]:
    """Turn an OS-level write failure into a one-line error naming the output."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full"
        else:
            reason = error.strerror or str(error)
        raise KvfuseError(f"could not write {out}: {reason}; nothing was written") from error
