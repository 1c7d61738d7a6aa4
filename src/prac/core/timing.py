"""Time and memory per phase: the one phase timer of prac.

:class:`PhaseTimer` adds each phase's seconds to a dict (the engine's capture, calibrate, prune,
propagate, ... of every block); :class:`PhaseMeter` is the same timer for a job's coarse phases (load,
dense_eval, prune, pruned_eval) plus each phase's peak memory.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch


class PhaseTimer:
    """Seconds per phase (capture, transfer, calibrate, prune, propagate, ...) into ``totals``.

    On the CPU: wall time (``perf_counter``). On CUDA: the time between two events recorded on the
    current stream at the phase's start and end — what the device's work stream spends on the phase,
    including waiting for the host. Nothing waits for the device per phase (a device-wide synchronize
    would also wait for the next block's copy on the prefetch stream, :mod:`prac.engine.residency`): the
    events are resolved by :meth:`flush`, which the engine calls after every block (only the events
    the device has passed) and at the end of the run (all, waiting for the last one)."""

    def __init__(self, device: torch.device, totals: dict[str, float]):
        self.device, self.totals = device, totals
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # (phase, start, end), unresolved

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.device.type != "cuda":
            start = time.perf_counter()
            try:
                yield
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            return
        stream = torch.cuda.current_stream(self.device)
        begin = torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        try:
            yield
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            self._events.append((name, begin, end))

    def flush(self, wait: bool = True) -> None:
        """Add the recorded phases' times to ``totals``: every one (``wait``: the host waits for the
        current stream to reach the last end event), or only those the device has already passed."""
        left = []
        for name, begin, end in self._events:
            if wait:
                end.synchronize()
            elif not end.query():
                left.append((name, begin, end))
                continue
            self.totals[name] = self.totals.get(name, 0.0) + begin.elapsed_time(end) / 1000.0
        self._events = left


def _host_peak() -> tuple[int, bool]:
    """The process's peak resident set (bytes) and whether it is VmHWM (resettable) or ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, True
    except (OSError, ValueError):
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, False  # KiB on Linux


def _reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PhaseMeter(PhaseTimer):
    """A :class:`PhaseTimer` over a job's phases (load, dense_eval, prune, pruned_eval), which also
    records each phase's peak memory; ``seconds`` is its ``totals``.

    On CUDA the device is synchronized at each phase's start and end (a job's phases are few and
    coarse), so a phase's time is its wall time, and its peak is ``max_memory_allocated`` since the
    phase began; on the CPU the peak is the process's peak RSS during the phase (Linux resets the
    kernel's high-water mark at each phase, so the meter keeps the whole process's peak itself).
    ``process_peak_rss_bytes`` is the process's peak over the whole run, on any device."""

    def __init__(self, device: torch.device):
        super().__init__(device, {})
        self.seconds = self.totals
        self.peaks: dict[str, int] = {}
        self.process_peak, self.resettable = _host_peak()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.process_peak = max(self.process_peak, _host_peak()[0])
            self.resettable = self.resettable and _reset_host_peak()
        try:
            with super().__call__(name):
                yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                self.flush()
            host = _host_peak()[0]
            self.process_peak = max(self.process_peak, host)
            peak = int(torch.cuda.max_memory_allocated(self.device)) if cuda else host
            self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def summary(self) -> dict[str, Any]:
        self.process_peak = max(self.process_peak, _host_peak()[0])
        if self.device.type == "cuda":
            kind = "cuda_allocated"
        else:
            kind = "process_peak_rss" if self.resettable else "process_peak_rss_cumulative"
        return {"peak_memory_bytes": max(self.peaks.values(), default=0), "peak_memory_kind": kind,
                "peak_memory_by_phase": dict(self.peaks), "process_peak_rss_bytes": int(self.process_peak)}
