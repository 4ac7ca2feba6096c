"""What this machine's CPU can run fast: read from its flags and from probes of the kernels themselves.

Flags say what the hardware has; a probe says what the kernels do with it (oneDNN may be capped by
ONEDNN_MAX_CPU_ISA, a compiler may be missing). The kind names the three families of CPU the project
runs on, by what matters for matrix products:

| kind | bf16 matrix units | e.g. |
|---|---|---|
| amx | AMX tiles | Intel Xeon, Sapphire Rapids or later |
| avx512-bf16 | AVX-512 BF16 dot products | AMD EPYC Zen 4 |
| avx2 | none: bf16 is converted in software | AMD EPYC Zen 3, most laptops |
| baseline | none, and no AVX2/FMA/F16C | old or emulated CPUs |
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

KINDS = ("amx", "avx512-bf16", "avx2", "baseline")
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
F16_KERNEL_FLAGS = frozenset({"avx2", "fma", "f16c"})  # what gemm.cpp is compiled for


@dataclass(frozen=True)
class Machine:
    cpu: str  # model name from /proc/cpuinfo
    cores: int
    threads: int  # torch's intra-op threads
    torch_isa: str  # torch.backends.cpu.get_cpu_capability(): what ATen dispatches to
    flags: frozenset[str]  # the FLAGS this CPU reports
    bf16_packed: bool  # oneDNN's packed bf16 product ran here and equalled F.linear
    rksc_fp16: str | None = None  # why rksc's compiled fp16 kernel cannot run here; None: it runs
    fbgemm_fp16: bool = False  # torch's fbgemm fp16 product runs here

    @property
    def kind(self) -> str:
        if self.bf16_packed and "amx_bf16" in self.flags:
            return "amx"
        if self.bf16_packed:
            return "avx512-bf16"
        return "avx2" if F16_KERNEL_FLAGS <= self.flags else "baseline"

    @property
    def bf16_units(self) -> bool:
        return self.bf16_packed

    @property
    def f16_kernel_isa(self) -> bool:
        """The CPU has the instructions rksc's fp16 kernel is compiled for."""
        return F16_KERNEL_FLAGS <= self.flags

    def describe(self) -> dict:
        return {"cpu": self.cpu, "kind": self.kind, "cores": self.cores, "threads": self.threads,
                "torch_isa": self.torch_isa, "flags": sorted(self.flags), "bf16_packed": self.bf16_packed,
                "rksc_fp16": "ok" if self.rksc_fp16 is None else self.rksc_fp16, "fbgemm_fp16": self.fbgemm_fp16}


def probe() -> Machine:
    """This machine: its hardware and kernels are probed once per process (the first probe may build
    rksc's kernels, a few seconds once per machine), its thread count is read now."""
    import torch

    cpu, flags, bf16, rksc, fbgemm = _facts()
    return Machine(cpu=cpu, cores=os.cpu_count() or 1, threads=torch.get_num_threads(),
                   torch_isa=torch.backends.cpu.get_cpu_capability(), flags=flags, bf16_packed=bf16,
                   rksc_fp16=rksc, fbgemm_fp16=fbgemm)


@functools.cache
def _facts() -> tuple[str, frozenset[str], bool, str | None, bool]:
    from rksc.kernels import gemm  # loads torch and may compile: only once the machine is probed

    return _cpu_name(), cpu_flags(), bf16_packed_works(), gemm.status().error, fbgemm_fp16_works()


def bf16_packed_works() -> bool:
    """Whether oneDNN packs a bf16 weight here and its product equals `F.linear` exactly (it raises
    on CPUs without bf16 instructions)."""
    import torch
    import torch.nn.functional as F

    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=g).bfloat16()
        x = torch.randn(3, 64, generator=g).bfloat16()
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            return torch.equal(y, F.linear(x, w))
    except (RuntimeError, AttributeError):
        return False


def fbgemm_fp16_works() -> bool:
    """Whether torch's fbgemm fp16 product runs here (it needs AVX2 and torch's fbgemm build)."""
    import torch

    if not F16_KERNEL_FLAGS <= cpu_flags():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(16, 32, generator=g), torch.randn(2, 32, generator=g)
        packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        y = torch.ops.quantized.linear_dynamic_fp16(x, packed)
        return torch.allclose(y, x @ w.half().float().T, rtol=1e-4, atol=1e-4)
    except (RuntimeError, AttributeError):
        return False


def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split()) & frozenset(FLAGS)
    except OSError:
        pass
    return frozenset()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
