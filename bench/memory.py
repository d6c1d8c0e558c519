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


class RayProcessPeaks:
    """Peak RSS of each Ray worker process (process title ``ray::...``: train
    workers, scoring actors, Ray Data tasks), sampled in a background thread.
    RSS counts the object-store pages a worker has mapped, so it errs high."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peaks: dict[int, int] = {}      # pid -> peak bytes
        self.titles: dict[int, set] = {}     # pid -> process titles seen (Ray retitles its workers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
                try:
                    title = " ".join(proc.info["cmdline"] or [])
                    if not title.startswith("ray::") or proc.info["memory_info"] is None:
                        continue
                    pid = proc.info["pid"]
                    self.peaks[pid] = max(self.peaks.get(pid, 0), proc.info["memory_info"].rss)
                    self.titles.setdefault(pid, set()).add(title.split()[0])
                except (psutil.Error, TypeError):
                    continue
            time.sleep(self.interval)

    def __enter__(self) -> "RayProcessPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, contains: str = "") -> tuple[float, str]:
        """(peak RSS in GiB, process) among the workers whose title contains ``contains``."""
        chosen = {pid: v for pid, v in self.peaks.items() if any(contains in t for t in self.titles[pid])}
        if not chosen:
            return 0.0, ""
        pid = max(chosen, key=chosen.get)
        return chosen[pid] / 2**30, f"pid {pid} ({', '.join(sorted(self.titles[pid]))[:120]})"
