"""Orbax's failures reported once, in one line: `checkpoint.Checkpointer` raises each failure itself
(CheckpointSaveError / CheckpointRestoreError); what Orbax, asyncio and TensorStore would print around it
(tracebacks from background threads, never-awaited coroutines, a closed event loop) is filtered here.
Importing this module installs the logging filters."""

from __future__ import annotations

import logging

# Orbax warns "Given directory is read only" for every read-only manager; a reader asks for exactly that.
logging.getLogger("absl").addFilter(lambda record: record.msg != "Given directory is read only=%s")


def _one_line_orbax_errors(record: logging.LogRecord) -> bool:
    """Orbax's background save threads log each failure with its traceback; `Checkpointer` raises the
    failure itself as one CheckpointSaveError line, so keep Orbax's lines but drop their tracebacks."""
    if record.exc_info and "orbax" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


logging.getLogger("absl").addFilter(_one_line_orbax_errors)


def _from_a_checkpoint_read_or_write(exc: BaseException | None) -> bool:
    """Whether an exception comes from Orbax or TensorStore: a frame of its traceback in orbax, or
    TensorStore's spec in its message (a read task wrapped by asyncio's `_wrap_awaitable` has no Orbax frame)."""
    if exc is None:
        return False
    if "tensorstore_spec" in str(exc):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _drop_checkpoint_task_errors(record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg):   # Task, Future, _GatheringFuture (asyncio.gather)
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return not ("orbax" in record.getMessage() or _from_a_checkpoint_read_or_write(exc))


# ... and asyncio reports the same failure once more for each of Orbax's read and write tasks and for the
# gather of them ("Task / Future / _GatheringFuture exception was never retrieved", with a traceback).
logging.getLogger("asyncio").addFilter(_drop_checkpoint_task_errors)


def reason(e: BaseException) -> str:
    """One line naming why a step failed to restore: the exception's first line, without TensorStore's
    multi-line spec dump."""
    first = (str(e).splitlines() or [""])[0].split(" See full TensorStore details")[0].strip().rstrip(".")
    if len(first) > 240:   # keep the start (what was written) and the end (the OS error)
        first = f"{first[:120]} ... {first[-110:]}"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def quiet_orbax_leftovers() -> None:
    """Drop two kinds of leftovers of a failed Orbax read or write from sys.unraisablehook, and only those.
    The failure itself is reported once, as one line (CheckpointRestoreError / CheckpointSaveError):
      * a failed restore leaves Orbax's other reads of that step as coroutines that are never awaited;
        garbage-collected, each prints its traceback ('Exception ignored in: <coroutine ...>', thousands
        of lines for one damaged step);
      * after a failed asynchronous save, TensorStore still completes that save's write futures and calls
        back into the event loop Orbax has closed: 'RuntimeError: Event loop is closed', about a hundred."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_rlp_jax_quiet", False):
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._rlp_jax_quiet = True
    sys.unraisablehook = hook
