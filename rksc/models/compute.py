"""Which dtype and weight format a model runs in on this machine: `choose(machine, dtype, weights)`.

`auto` (the default of `--dtype` and `--weights`) picks what was measured fastest on each kind of CPU
(benchmarks/cpu_kernels.py; `rksc info --measure` times it on yours):

| kind | dtype (activations, KV) | weights | kernel |
|---|---|---|---|
| amx, avx512-bf16 | bfloat16 | bf16, packed once | oneDNN |
| avx2 | float32 | fp16 (exact copies of the prepared bf16 weights) | rksc's compiled kernel, else fbgemm |
| baseline | float32 | fp32 | MKL |

Every auto choice keeps the prepared weights exactly; the lossy int8 format (`--weights int8`, rksc's
kernel, float32 activations) is never chosen by `auto`. A choice the
machine cannot run is a one-line RkscError, never a silent fall back to a slow kernel.
Pure: a `Machine` in, a `Compute` out, so the choice is tested for every kind on any one machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from rksc import validate
from rksc.errors import RkscError
from rksc.kernels.machine import Machine

NATIVE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float32", "int8": "float32"}
KERNELS = {"mkl": "MKL F.linear", "onednn": "oneDNN packed bf16", "rksc": "rksc fp16 kernel (compiled, AVX2)",
           "rksc-int8": "rksc int8 kernel (compiled, AVX2)",
           "fbgemm": "fbgemm fp16 (torch)"}


@dataclass(frozen=True)
class Compute:
    dtype: str  # activations and KV cache: float32, bfloat16 or float16
    weights: str  # fp32, bf16, fp16 or int8 (rksc.models.weights)
    kernel: str  # a key of KERNELS
    reasons: tuple[str, ...] = ()  # why, one line each
    auto: bool = False  # the weight format was chosen by auto (it may give way to fp32 for a model it cannot hold)

    def describe(self) -> dict:
        return {"dtype": self.dtype, "weights": self.weights, "kernel": self.kernel, "reasons": list(self.reasons)}

    @property
    def label(self) -> str:
        return f"{self.dtype}, {self.weights} weights ({KERNELS[self.kernel]})"


def choose(machine: Machine, dtype: str = "auto", weights: str = "auto") -> Compute:
    validate.dtype(dtype)
    validate.weights(weights)
    reasons, auto = [], weights == "auto"
    fp16_kernel, fp16_note = _fp16_kernel(machine)
    units = machine.bf16_packed
    if dtype == "auto":
        if weights != "auto":
            dtype = NATIVE_DTYPE[weights]
            reasons.append(f"dtype {dtype}: what {weights} weights compute in")
        elif units:
            dtype = "bfloat16"
            reasons.append(f"dtype bfloat16: this CPU ({machine.kind}) has bf16 matrix units")
        else:
            dtype = "float32"
            reasons.append(f"dtype float32: this CPU ({machine.kind}) has no bf16 matrix units, so bf16 "
                           "arithmetic would run in software")
    if weights == "auto":
        if dtype == "bfloat16" and units:
            weights = "bf16"
            reasons.append("weights bf16, packed once for oneDNN: the bf16 units multiply them directly")
        elif fp16_kernel:
            weights = "fp16"
            reasons.append("weights fp16: half the bytes of fp32 and exactly the prepared weights, multiplied in "
                           "fp32" + ("" if dtype == "float32" else f" (inputs cast from {dtype})"))
        elif dtype == "float32":
            weights = "fp32"
            reasons.append(f"weights fp32: no fp16 kernel runs here ({fp16_note})")
        else:
            raise RkscError(f"--dtype {dtype} needs bf16 matrix units or an fp16 kernel, and this CPU "
                            f"({machine.kind}) has neither ({fp16_note}); use --dtype float32 or auto")
    if weights == "fp32":
        if dtype != "float32":
            raise RkscError(f"--weights fp32 computes in float32; use --dtype float32 or auto, not {dtype}")
        return Compute(dtype, weights, "mkl", tuple(reasons), auto)
    if weights == "bf16":
        if dtype != "bfloat16":
            raise RkscError(f"--weights bf16 computes in bfloat16; use --dtype bfloat16 or auto, not {dtype}")
        if not units:
            raise RkscError(f"--weights bf16 needs bf16 matrix instructions (AVX-512-BF16 or AMX) and this CPU "
                            f"({machine.kind}) has none: every bf16 product would run in a slow software "
                            "fallback; use --weights fp16, fp32 or auto")
        return Compute(dtype, weights, "onednn", tuple(reasons), auto)
    if weights == "int8":
        if machine.rksc_fp16 is not None:
            raise RkscError(f"--weights int8 needs rksc's compiled kernel (AVX2, FMA and F16C, and a C++ compiler), "
                            f"and it cannot run here ({machine.rksc_fp16}); use --weights auto")
        if dtype != "float32":
            reasons.append(f"int8 weights multiplied in fp32, inputs cast from {dtype}")
        reasons.append("weights int8 (lossy): 1.125 bytes per weight, each run of 32 rounded to 255 levels")
        return Compute(dtype, weights, "rksc-int8", tuple(reasons), auto)
    if not fp16_kernel:
        raise RkscError(f"--weights fp16 needs AVX2, FMA and F16C and a kernel for them, and none runs on this CPU "
                        f"({fp16_note}); use --weights fp32 or auto")
    if fp16_kernel == "fbgemm":
        reasons.append(f"kernel fbgemm: rksc's compiled kernel is not available ({machine.rksc_fp16})")
    return Compute(dtype, weights, fp16_kernel, tuple(reasons), auto)


def _fp16_kernel(machine: Machine) -> tuple[str | None, str]:
    if machine.rksc_fp16 is None:
        return "rksc", ""
    if machine.fbgemm_fp16:
        return "fbgemm", machine.rksc_fp16
    return None, machine.rksc_fp16


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1.125}  # int8: a 4-byte step per 32 weights
EXACT = {"fp32": True, "bf16": True, "fp16": True, "int8": False}  # holds the prepared weights exactly


def formats(machine: Machine) -> list[dict]:
    """Each weight format on this machine: whether it runs, its dtype and kernel, or why not."""
    rows = []
    for fmt in BYTES:
        try:
            c = choose(machine, "auto", fmt)
            rows.append({"weights": fmt, "runs": True, "dtype": c.dtype, "kernel": c.kernel, "bytes": BYTES[fmt],
                         "exact": EXACT[fmt], "note": c.reasons[-1] if c.kernel == "fbgemm" else ""})
        except RkscError as e:
            rows.append({"weights": fmt, "runs": False, "dtype": NATIVE_DTYPE[fmt], "kernel": None,
                         "bytes": BYTES[fmt], "exact": EXACT[fmt], "note": str(e)})
    return rows


def measure(machine: Machine, rows=(1, 8, 32, 512), shape=(4864, 896), layers: int = 8, repeats: int = 7) -> list[dict]:
    """Milliseconds per product of one [N, K] layer (default: Qwen2.5-0.5B's MLP) in each format that runs
    here, at each row count: `layers` distinct weights in turn, so they stream from memory as in a model
    (not from cache); the median of `repeats` passes, formats interleaved within each pass."""
    import statistics
    import time

    import torch
    from torch import nn

    from rksc.models.weights import convert  # torch: only for rksc info --measure

    n, k = shape
    g = torch.Generator().manual_seed(0)
    runnable = [f for f in formats(machine) if f["runs"]]
    stacks = {}
    for f in runnable:
        dtype = getattr(torch, f["dtype"])
        mods = []
        for _ in range(layers):
            layer = nn.Sequential(nn.Linear(k, n, bias=False))
            with torch.no_grad():
                layer[0].weight.copy_((torch.randn(n, k, generator=g) * 0.02).bfloat16())
            layer = layer.to(dtype)
            convert(layer, f["weights"], f["kernel"])
            mods.append(layer)
        stacks[f["weights"]] = (mods, dtype)
    out = []
    with torch.inference_mode():
        for m in rows:
            times = {w: [] for w in stacks}
            xs = {w: torch.randn(m, k, generator=g).to(dtype) for w, (_, dtype) in stacks.items()}
            for w, (mods, _) in stacks.items():  # warm-up
                mods[0](xs[w])
            for _ in range(repeats):
                for w, (mods, _) in stacks.items():
                    t = time.perf_counter()
                    for mod in mods:
                        mod(xs[w])
                    times[w].append((time.perf_counter() - t) / layers)
            for w in stacks:
                ms = statistics.median(times[w]) * 1000
                out.append({"weights": w, "rows": m, "ms": ms, "gflops": 2 * m * n * k / ms / 1e6,
                            "gbytes_s": n * k * BYTES[w] / ms / 1e6})
    return out
