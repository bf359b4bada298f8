"""The report of a long job over many inputs (`eval-qa`, `eval-needle`, `train-vqgan`, `eval-vqgan`): a bad input is
recorded and the job goes on; the report is kept up to date so that a bad input or a crash never costs the
finished work; the exit status says whether some inputs were left out."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_BAD_INPUTS = 3  # the exit status of a job that finished without some inputs (listed in its report)
EXIT_HELP = (
    "exit status: 0 when every input was used; 3 when the job finished without some unreadable inputs (each "
    "named on stderr and listed in its report); 2 for bad arguments or when no input could be used"
)
BAD_INPUT_ERRORS = (ValueError, OSError)  # what a bad input raises: VideoError, bad JSON, a missing file, ...


def attempt(report: JobReport | None, input: str, fn: Callable[[], Any], **context) -> Any:
    """`fn()`, one input's work. A bad-input error is recorded in `report` (with `context`) and None returned;
    without a report it is raised."""
    try:
        return fn()
    except BAD_INPUT_ERRORS as err:
        if report is None:
            raise
        report.fail(input, err, **context)
        return None


class JobReport:
    """The JSON report of a long job over many inputs, kept up to date so that a bad input or a crash never costs
    the finished work.

    `attempt(report, input, fn)` runs one input's work: a bad input (one of `BAD_INPUT_ERRORS`: a missing,
    truncated or corrupt video, an unreadable entry) is recorded (`fail`) and printed to stderr as one line naming
    the file and the cause, and the job goes on. `save()` writes `build()` to `path` atomically (local or gs://)
    with `complete`, `failed` (the count) and `failures` ([{"input", "error", ...}]) added; the job calls it as
    results come in and it writes at most every `every_s` seconds. As a context manager it writes once more on
    the way out, `complete` false when an error stopped the job (nothing when that came before any result or
    failure). `exit_code`: 0, or `EXIT_BAD_INPUTS` when some input failed.
    """

    def __init__(
        self, command: str, path: str | os.PathLike, build: Callable[[], dict] = dict, every_s: float = 30.0
    ):
        self.command, self.path, self.build, self.every_s = command, str(path), build, every_s
        self.failures: list[dict[str, Any]] = []
        self._written: float | None = None  # time.monotonic() of the last write

    def fail(self, input: str, error: BaseException | str, **context) -> None:
        """Record a bad input, say so on stderr and save."""
        from tqdm import tqdm

        if isinstance(error, OSError) and error.strerror and error.filename:  # not "[Errno 2] ..."
            text = f"{error.strerror}: {error.filename}"
        else:
            text = str(error).strip() or type(error).__name__
        self.failures.append({"input": str(input), "error": text, **context})
        message = text if str(input) in text else f"{input}: {text}"
        tqdm.write(f"{self.command}: {message} (skipped, listed in {self.path})", file=sys.stderr)
        self.save()

    def save(self, *, complete: bool = False, force: bool = False) -> None:
        """Write the report (unless the last write is under `every_s` seconds old and not `force`)."""
        from lvm.data_pipeline import storage

        if not force and self._written is not None and time.monotonic() - self._written < self.every_s:
            return
        report = {
            "complete": complete,
            "failed": len(self.failures),
            "failures": self.failures,
            **self.build(),
        }
        storage.write_bytes(self.path, (json.dumps(report, indent=2) + "\n").encode())
        self._written = time.monotonic()

    @property
    def exit_code(self) -> int:
        return EXIT_BAD_INPUTS if self.failures else 0

    def __enter__(self) -> JobReport:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or self._written is not None:
            self.save(complete=exc is None, force=True)
