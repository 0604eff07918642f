"""A program's stages as the runtime builds them: `RuntimePlan` (what an executor needs
from a program, as plain values that travel to Ray actors) and `StageRunner` (one stage's
layers and KV cache on its device). Both executors (server/runtime/executor.py in this
process, server/runtime/ray_executor.py in Ray actors) build their stages from here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from scheduler.model import ModelSpec
from scheduler.program import ProgramView
from server.runtime.compiled import CompiledStage
from server.runtime.model import TORCH_DTYPES, StageModel, rope_frequencies
from server.runtime.step import StepTensors
from server.runtime.weights import init_random, load_checkpoint

log = logging.getLogger("lockstep.stage")


@dataclass(frozen=True)
class StageSpec:
    index: int
    layer_start: int
    layer_end: int
    device: str  # torch device string: "cpu", "cuda:0", ...
    resource: str = ""  # Ray custom resource a simulated chip asks for ("" = none)


@dataclass(frozen=True)
class RuntimePlan:
    """What an executor needs from a program, as plain values (travels to Ray actors)."""

    spec: ModelSpec
    dtype: str  # fp32 | bf16 | fp16
    slots: int
    max_context: int
    stages: tuple[StageSpec, ...]
    seed: int = 0  # random-init seed when no checkpoint
    checkpoint: str = ""  # Hugging Face folder with *.safetensors
    pack_weights: bool = True  # prepack CPU linears for oneDNN (see model.Linear)
    compiled: bool = False  # run CPU stages as compiled steps (server/runtime/compiled.py)


def torch_device_for(kind: str, device_index: int, cuda_count: int) -> str:
    """A program device to a torch device: GPUs map to cuda:N; `cpu` and simulated chips
    (lpu, ...) run on the host."""
    if kind == "gpu":
        if cuda_count == 0:
            raise ValueError("the program places stages on GPUs but this host has no CUDA device")
        return f"cuda:{device_index % cuda_count}"
    return "cpu"


def plan_from_program(program: ProgramView, *, dtype: str | None = None, seed: int = 0, checkpoint: str = "",
                      device: str | None = None, compiled: bool = False) -> RuntimePlan:
    """The executor's part of a program. `device` forces every stage onto one torch device."""
    spec = program.model
    rope_frequencies(spec)  # a RoPE scaling the runtime does not serve is refused here, by name
    dtype = dtype or program.weight_dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"the runtime computes in {', '.join(TORCH_DTYPES)}; the program's weights are {dtype} "
                         f"(compile with --dtype fp32 or bf16 to serve)")
    cuda_count = torch.cuda.device_count()
    stages = tuple(StageSpec(st.index, st.layers[0], st.layers[1],
                             device or torch_device_for(st.kind, st.devices[0], cuda_count),
                             resource=st.device if st.kind == "simulated" else "")
                   for st in program.stages)
    return RuntimePlan(spec, dtype, program.max_slots, program.max_context, stages, seed, checkpoint,
                       compiled=compiled)


class StageRunner:
    """One stage's layers and KV cache on its device."""

    def __init__(self, plan: RuntimePlan, stage: StageSpec):
        self.stage = stage
        self.device = torch.device(stage.device)
        self.is_last = stage.index == len(plan.stages) - 1
        self.max_context = plan.max_context
        torch.manual_seed(0)  # module construction draws; the weights are then overwritten
        model = StageModel(plan.spec, stage.layer_start, stage.layer_end, plan.slots, plan.max_context,
                           TORCH_DTYPES[plan.dtype])
        if plan.checkpoint:
            load_checkpoint(model, plan.checkpoint)
        else:
            init_random(model, plan.seed)
        self.model = model.to(self.device).eval()
        # The compiled step (a package of its own, weights frozen in), or why not: then eager.
        self.compiled, self.compile_note = None, "off"
        if plan.compiled:
            built = CompiledStage.build(self.model)
            if isinstance(built, str):
                self.compile_note = built
                log.warning("stage %d: compiled steps off, eager instead: %s", stage.index, built)
            else:
                self.compiled = built
                self.compile_note = (f"on ({'loaded' if built.cached else 'compiled'} in {built.seconds:.1f} s: "
                                     f"{built.path.name})")
                self.model.drop_weights()  # the package holds its own copy; the cache stays here
        if plan.pack_weights and self.compiled is None:
            self.model.pack_linears()

    @property
    def scratch_slot(self) -> int:
        return self.model.scratch_slot

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, x: torch.Tensor, meta: StepTensors) -> tuple[torch.Tensor, float]:
        """x: token ids [N] or hidden [N, h] (rows packed; see step.StepTensors). Returns (output, seconds on this stage)."""
        start = time.perf_counter()
        meta = meta.to(self.device)
        forward = self.model if self.compiled is None else self.compiled
        out = forward(x.to(self.device, non_blocking=True), meta.positions, meta.write_slots, meta.attend,
                      meta.last_index)
        self._sync()
        return out, time.perf_counter() - start
