"""Where a benchmark column's wall time goes: exclusive timers on a few methods of one engine
(or of the naive loop's models), attached to those objects only and removed afterwards.

Buckets of an engine column:
  forward     ``ModelRunner.run_model``: the Hugging Face forward (python and compute);
  step_prep   host-side packing around it: ``StaticStep.forward`` / ``ModelRunner.forward``
              (layout, buffer copies) and ``ModelRunner.metadata`` (paged-attention indices);
  sampling    the fused ``eft_sample`` calls of decode and speculative rounds (input
              tensors and validation included) and rejection acceptance;
  scheduling  ``Scheduler.schedule`` (admission, block reservation, preemption);
  other       the rest of the wall time: appending tokens and stop checks, speculative
              round bookkeeping, deltas and outputs, prefill sampling, the loop itself.
Each timer counts only the time not spent in a nested timer, so the buckets add up.
"""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager

BUCKETS = ("forward", "step_prep", "sampling", "scheduling", "other")


def breakdown(bucket_seconds: dict[str, float], wall_s: float) -> dict:
    """Seconds per bucket, "other" being the wall time outside every timer, and fractions."""
    timed = sum(v for b, v in bucket_seconds.items() if b != "other")
    seconds = dict(bucket_seconds, other=max(wall_s - timed, 0.0))
    return {"seconds": seconds, "fraction": {b: v / wall_s if wall_s > 0 else 0.0 for b, v in seconds.items()}}


class Profiler:
    """Exclusive wall-time buckets of wrapped callables."""

    def __init__(self, buckets: tuple[str, ...] = BUCKETS):
        self.buckets = buckets
        self.seconds = {b: 0.0 for b in buckets}
        self.calls = {b: 0 for b in buckets}
        self.detail: dict[str, dict] = {}      # finer keys (e.g. one model's forwards of one size)
        self._children: list[float] = []     # time spent in nested timers, per open frame
        self._patched: list[tuple] = []        # (object, attribute, had its own, original)

    def timed(self, fn, bucket: str, detail=None):
        """``fn`` wrapped to add its exclusive wall time to ``bucket``, and to
        ``self.detail[detail(*args, **kwargs)]`` when ``detail`` is given."""
        if bucket not in self.buckets:
            raise ValueError(f"bucket must be one of {self.buckets}, got {bucket!r}")

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self._children.pop()
                self.seconds[bucket] += elapsed - nested
                self.calls[bucket] += 1
                if detail is not None:
                    entry = self.detail.setdefault(detail(*args, **kwargs), {"seconds": 0.0, "calls": 0})
                    entry["seconds"] += elapsed - nested
                    entry["calls"] += 1
                if self._children:
                    self._children[-1] += elapsed

        return timed

    def wrap(self, obj, name: str, bucket: str, detail=None) -> None:
        """Time ``obj.name`` (a method or function attribute of this one object) into ``bucket``
        (see :meth:`timed`) until :meth:`restore`."""
        inner = getattr(obj, name)
        had_own = name in getattr(obj, "__dict__", {})
        setattr(obj, name, self.timed(inner, bucket, detail))
        self._patched.append((obj, name, had_own, inner))

    def restore(self) -> None:
        for obj, name, had_own, inner in reversed(self._patched):
            if had_own:
                setattr(obj, name, inner)
            else:
                delattr(obj, name)
        self._patched.clear()


def instrument_engine(profiler: Profiler, engine, *, sampling: str = "sampling", op: str | None = None) -> None:
    """Attach the engine buckets' timers to one EFTEngine (its runners, static steps, decoder,
    speculative decoder and scheduler). Call after a warm-up, so lazily built steps exist.

    ``sampling``: the bucket of the sampling calls; ``op``: if given, the bucket of the fused
    op itself inside them (``eft_fast.ops.run_backend`` as the sampler calls it)."""
    for runner in engine.runners:
        profiler.wrap(runner, "run_model", "forward", detail=_forward_detail(runner.role))
        profiler.wrap(runner, "forward", "step_prep")
        profiler.wrap(runner, "metadata", "step_prep")
    decoder = engine.decoder
    steps = list(decoder.decode_steps)
    spec = decoder.speculative
    if spec is not None:
        steps += list(spec._verify_steps.values())
        profiler.wrap(spec, "_sample", sampling)
        profiler.wrap(spec, "_rejection", sampling)
    for step in steps:
        profiler.wrap(step, "forward", "step_prep")
    profiler.wrap(decoder, "sample", sampling)
    if op is not None:
        from ..engine import sampler

        profiler.wrap(sampler, "run_backend", op)
    profiler.wrap(engine.scheduler, "schedule", "scheduling")


def _forward_detail(role: str):
    """Detail key of a ``run_model(input_ids [T], ...)`` call: the model and T."""
    return lambda input_ids, *args, **kwargs: f"{role} forward, {input_ids.shape[0]} tokens"


@contextmanager
def profiled(profiler: Profiler):
    try:
        yield profiler
    finally:
        profiler.restore()
