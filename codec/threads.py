"""How many intra-op threads a training step should use on a shared CPU, measured as it runs."""
from __future__ import annotations

import torch

__all__ = ["ThreadTuner"]


class ThreadTuner:
    """Choose between 1 and ``n`` intra-op threads by measured step wall time.

    On a shared CPU that is oversubscribed, OpenMP's barrier between the
    threads of every operator stalls whenever one of them is descheduled:
    measured here, with a load average of ~10-14 on 2 cores, 2 threads took
    12-20 s per step against 2-4 s for 1 thread (and 3-5x the CPU time),
    while on an idle machine 2 threads are ~1.8x faster. The load changes as
    other jobs come and go, so every ``probe_every`` steps the tuner runs up
    to ``probe_len`` steps with the other setting (after one warm-up step)
    and keeps whichever median step time is lower (by more than 10%). A probe
    whose first measured step is over twice the current median is cut short,
    and after each probe that does not switch the interval doubles (up to
    ``max_backoff`` times), so a hopeless setting costs little. A probe also
    comes after ``probe_after_s`` seconds, however few steps they held: when
    other jobs start, a step can take ten times longer, and a step-counted
    interval then kept the worse setting for most of an hour (session 6).
    And a probe comes at once when the median step time jumps past
    ``jump`` times what it was when the setting was chosen: with one
    single-threaded job beside it, 2 threads went from 0.38 to 3 s per step
    while 1 thread took ~0.7 (session 10), so even 600 s at the wrong
    setting cost more than 100 steps.
    """

    def __init__(self, max_threads: int, probe_every: int = 300, probe_len: int = 6, max_backoff: int = 8,
                 probe_after_s: float = 600.0, jump: float = 2.0):
        self.candidates = sorted({1, max(1, int(max_threads))})
        self.base_every, self.probe_len, self.max_backoff = probe_every, probe_len, max_backoff
        self.probe_after_s, self.jump = probe_after_s, jump
        self.reference: float | None = None  # median step time when the current setting was chosen
        self.seconds_since_probe = 0.0
        self.probe_every = probe_every
        self.current = self.candidates[0]
        self.times = {c: [] for c in self.candidates}
        self.probe: int | None = None
        self.probe_left = 0
        self.since_probe = max(0, probe_every - 2 * probe_len)  # first probe comes early
        torch.set_num_threads(self.current)

    @property
    def active(self) -> int:
        return self.probe if self.probe is not None else self.current

    @staticmethod
    def _median(v: list[float]) -> float:
        v = sorted(v)
        return v[len(v) // 2]

    def record(self, dt: float) -> dict | None:
        """Feed one step's wall time; returns a decision record after each probe."""
        if len(self.candidates) < 2:
            return None
        if self.probe is None:
            t = self.times[self.current]
            t.append(dt)
            del t[:-self.probe_len]
            self.since_probe += 1
            self.seconds_since_probe += dt
            due = self.since_probe >= self.probe_every or self.seconds_since_probe >= self.probe_after_s
            if len(t) >= self.probe_len:
                if self.reference is None:
                    self.reference = self._median(t)
                due = due or self._median(t) > self.jump * self.reference
            if due and len(t) >= self.probe_len:
                self.probe = [c for c in self.candidates if c != self.current][0]
                self.probe_left = self.probe_len + 1
                self.times[self.probe] = []
                torch.set_num_threads(self.probe)
            return None
        self.probe_left -= 1
        if self.probe_left < self.probe_len:  # skip the first (warm-up) step
            self.times[self.probe].append(dt)
        cur_t = self._median(self.times[self.current])
        hopeless = len(self.times[self.probe]) == 1 and self.times[self.probe][0] > 2 * cur_t
        if self.probe_left > 0 and not hopeless:
            return None
        alt_t = self._median(self.times[self.probe])
        old = self.current
        if alt_t < 0.9 * cur_t:
            self.current = self.probe
            self.probe_every = self.base_every
            self.times[self.current] = self.times[self.current][-self.probe_len:]
            self.reference = alt_t
        else:
            self.probe_every = min(self.probe_every * 2, self.base_every * self.max_backoff)
            self.reference = cur_t
        self.probe, self.since_probe, self.seconds_since_probe = None, 0, 0.0
        torch.set_num_threads(self.current)
        return {"event": "threads", "threads": self.current, "previous": old,
                "median_s": {str(old): round(cur_t, 4),
                             str([c for c in self.candidates if c != old][0]): round(alt_t, 4)},
                "next_probe_in": self.probe_every}
