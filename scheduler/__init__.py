"""Lockstep's compiler: model + device pool -> a timed, deterministic program.

Pure Python and numpy: no torch, Ray, gRPC or Prometheus (a test proves it).
"""

from scheduler.compiler import CompileOptions, compile
from scheduler.cost import Calibration, CostModel
from scheduler.devices import DeviceSpec, Pool, get_device, load_pool, parse_pool
from scheduler.errors import FitError, SpecError
from scheduler.ir import ModelIR, build_ir
from scheduler.model import ModelSpec, from_hf_config, get_model
from scheduler.program import Program

__all__ = [
    "Calibration", "CompileOptions", "CostModel", "DeviceSpec", "FitError", "ModelIR", "ModelSpec",
    "Pool", "Program", "SpecError", "build_ir", "compile", "from_hf_config", "get_device", "get_model",
    "load_pool", "parse_pool",
]
