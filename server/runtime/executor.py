"""Stage executors: run a compiled program's stages on torch devices, one step at a time.

- `LocalExecutor`: every stage in this process (the default on one host, and for
  simulated pools, whose math runs on the host CPU).
- `RayExecutor` (server/runtime/ray_executor.py): one Ray actor per stage, chained with a Ray
  Compiled Graph. Imported lazily by `make_executor`, so the local path never loads Ray.

Both build each stage with `StageRunner` (server/runtime/stage.py), so for the same program, weights and
`StepBatch` they return the same tokens.
"""

from __future__ import annotations

import time

from server.runtime.sampling import sample
from server.runtime.stage import RuntimePlan, StageRunner
from server.runtime.step import StepBatch, StepResult, tensorize


class LocalExecutor:
    def __init__(self, plan: RuntimePlan):
        self.plan = plan
        self.runners = [StageRunner(plan, stage) for stage in plan.stages]

    def step(self, batch: StepBatch) -> StepResult:
        start = time.perf_counter()
        meta = tensorize(batch, self.runners[0].scratch_slot, self.plan.max_context)
        x, times = meta.tokens, []
        for runner in self.runners:
            x, seconds = runner.run(x, meta)
            times.append(seconds)
        ids = sample(x, list(batch.sampling), batch.sample_positions())
        return StepResult(tuple(ids), tuple(times), time.perf_counter() - start)

    def compiled(self) -> bool:
        """Whether every stage runs compiled steps (a stage that could not compile runs
        eager, its reason logged: server/runtime/stage.py)."""
        return bool(self.runners) and all(runner.compiled is not None for runner in self.runners)

    def submit(self, batch: StepBatch) -> StepResult:
        """The pipelined engine's interface (see RayExecutor.submit): here the stages run
        one after another in this thread, so the step is done on return."""
        return self.step(batch)

    def collect(self, submitted: StepResult) -> StepResult:
        return submitted

    def close(self) -> None:
        self.runners = []


def make_executor(plan: RuntimePlan, kind: str = "local", **options):
    """The one factory: `local`, or `ray` (imports Ray only then; options go to RayExecutor)."""
    if kind == "local":
        return LocalExecutor(plan)
    if kind == "ray":
        from server.runtime.ray_executor import RayExecutor

        return RayExecutor(plan, **options)
    raise ValueError(f"unknown executor {kind!r}; expected local or ray")
