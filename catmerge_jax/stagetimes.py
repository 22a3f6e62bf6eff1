"""Where a run's time went: wall seconds per stage, with JAX's compile time split out as a stage of its own.

Tracing, lowering and XLA compilation (or loading a program from the persistent compilation cache) happen inside
whichever stage first calls a program; :class:`StageTimes` takes them out of that stage and counts them under
``"compile"``, from the time spans JAX reports through :mod:`jax.monitoring` (nested spans, e.g. a jitted function
traced inside another, are counted once). ``catmerge merge`` prints :meth:`StageTimes.line` as its closing line.

>>> import time
>>> clock = StageTimes()
>>> with clock.stage("load"):
...     time.sleep(0.01)
>>> clock.seconds["load"] >= 0.01, clock.seconds["compile"]
(True, 0.0)
>>> clock.line().startswith("time: load ")
True
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
"""JAX's monitoring events whose time spans count as compile time (the last one includes cache loads)."""


def union_seconds(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of the intervals ``spans`` clipped to ``[start, end]``.

    >>> union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)], 0.0, 5.5)
    3.5
    """
    total, reach = 0.0, start
    for a, b in sorted(spans):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


class StageTimes:
    """Wall seconds per named stage (:attr:`seconds`, in the order stages first ran) and ``"compile"``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"compile": 0.0}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (added up when a stage runs more than once); JAX compile time inside
        it goes to ``"compile"``."""
        spans: list[tuple[float, float]] = []

        def listen(event: str, begin: float, finish: float, **kwargs) -> None:
            if event in COMPILE_EVENTS:
                spans.append((begin, finish))

        import jax.monitoring as monitoring

        monitoring.register_event_time_span_listener(listen)
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            monitoring.unregister_event_time_span_listener(listen)
            compiling = union_seconds(spans, start, end)
            self.seconds[name] = self.seconds.get(name, 0.0) + (end - start) - compiling
            self.seconds["compile"] += compiling

    def line(self, order: tuple[str, ...] = ("load", "statistics", "compile", "solve", "write")) -> str:
        """``time: load 0.8 s, statistics 1.1 s, compile 2.9 s, solve 1.0 s, write 0.2 s (total 6.0 s)``: the
        stages of ``order`` first (those that ran, and ``compile`` always), then any others."""
        names = [n for n in order if n in self.seconds] + [n for n in self.seconds if n not in order]
        shown = ", ".join(f"{n} {self.seconds[n]:.1f} s" for n in names)
        return f"time: {shown} (total {sum(self.seconds.values()):.1f} s)"


__all__ = ["StageTimes", "union_seconds", "COMPILE_EVENTS"]
