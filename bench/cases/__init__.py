"""Bench cases, one module per kernel (same name as `kernels/<name>.mojo`), plus whole-model cases.

Each module has `BENCH` (the name in the JSON) and `results(quick, machine) -> list[dict]` (JSON rows).
"""

from . import compile as compile_case
from . import attention, e2e, linear, moe_experts, moe_router, real_slice, rms_norm

MODULES = [moe_router, moe_experts, attention, linear, rms_norm, e2e, real_slice, compile_case]
