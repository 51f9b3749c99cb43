"""Progress display for long steps (rich spinner with elapsed time on stderr); silent when quiet."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator

from rich.console import Console


class Steps:
    """Announce named steps; each shows a spinner while it runs and its duration when done."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.quiet:
            yield
            return
        with self.console.status(f"{title}…"):
            yield
        self.console.print(f"[green]✓[/green] {title} ({time.perf_counter() - start:.1f} s)")


LIBRARY_LOGGERS = ("onnx_ir", "onnxscript", "onnx")


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Keep the graph libraries' own log records (e.g. onnx_ir's shape inference warnings,
    each with a traceback) off the terminal while kvfuse works; kvfuse reports what matters."""
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, previous, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the tracer warnings and info logs transformers/Optimum print during export."""
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    optimum_logger = logging.getLogger("optimum")
    previous_optimum = optimum_logger.level
    optimum_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(previous)
        transformers.logging.enable_progress_bar()
        optimum_logger.setLevel(previous_optimum)
