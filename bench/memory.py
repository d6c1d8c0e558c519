"""Peak-memory sampling shared by the benchmarks."""
from __future__ import annotations

import threading
import time

import psutil


class PeakMemory:
    """Samples, in a background thread, the machine's memory in use (total −
    available: counts Ray's object store and every worker, each page once)
    relative to the start, and this process's own RSS."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.baseline = self._used()
        self.peak_used = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _used() -> int:
        vm = psutil.virtual_memory()
        return vm.total - vm.available

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.peak_used = max(self.peak_used, self._used() - self.baseline)
            self.peak_rss = max(self.peak_rss, me.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_used_gib(self) -> float:
        return self.peak_used / 2**30

    @property
    def peak_rss_gib(self) -> float:
        return self.peak_rss / 2**30
