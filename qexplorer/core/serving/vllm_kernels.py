"""The kernel path vLLM takes for each format on each device: expected in the plan, read from its log after.

Every pattern below is a logger line of vLLM 0.32's source (paths relative to the ``vllm`` package):

==========================================  ====================================================================
``Selected %s for %s``                      scaled-mm (FP8 / INT8 W8A8): ``model_executor/kernels/linear/__init__.py``
                                            l. 759, 798, 847, 1116 (kernel, scheme class)
``Using %s for CompressedTensorsWNA16``     W4A16: ``compressed_tensors/schemes/compressed_tensors_wNa16.py`` l. 138
``Using %s for mixed-precision linear``     W4A16: ``linear/__init__.py`` l. 923
``Using %s for NVFP4 GEMM``                 NVFP4 and NVFP4A16: ``linear/__init__.py`` l. 1196, 1240
``Using {b} Fp8 MoE backend``, ``Using      MoE: ``layers/fused_moe/oracle/fp8.py`` l. 418, ``nvfp4.py`` l. 242,
'{b}' NvFp4 MoE backend``, ``Using '{b}'    ``int_wna16.py`` l. 287, ``unquantized.py`` l. 266
WNA16 MoE backend``, ``Using {b}
Unquantized MoE backend``
``Weight-only FP8/FP4 compression will be   the Marlin fallbacks: ``quantization/utils/marlin_utils_fp8.py`` l. 108,
used leveraging the Marlin kernel``         ``kernels/linear/nvfp4/marlin.py`` l. 34
``NVFP4 linear falling back to the slow     ``linear/__init__.py`` l. 1231
and unoptimized emulation backend``
==========================================  ====================================================================

What a kernel means depends on the device. Marlin, Machete, Exllama, Conch and the Triton W4A16 kernel are
weight-only: the weights are dequantized inside the kernel and the maths is BF16. The CUTLASS / FlashInfer /
CuTe-DSL FP4 kernels (not their W4A16 variants) run on FP4 tensor cores (CC ≥ 10). The Torch FP8 kernels call
``torch._scaled_mm``: native FP8 on a GPU of CC ≥ 8.9 (``platforms/cuda.py`` l. 585), an emulation on a CPU.
NVFP4A16 is weight-only on every GPU: with ``--linear-backend auto`` vLLM forces FP4-Marlin on every CC but
9.0 and 10.x (``linear/__init__.py`` l. 1174-1185) - never FP4 tensor cores. NVFP4 W4A4 below CC 10 takes the
same Marlin path: served weight-only, its activations not quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qexplorer.core.kinds import SupportMode
from qexplorer.core.precisions import Precision

_LINES = (
    re.compile(r"Selected (?P<kernel>\w+) for (?P<layer>\w+)"),
    re.compile(r"Using (?P<kernel>\w+) for (?P<layer>CompressedTensorsWNA16|mixed-precision linear|NVFP4 GEMM)"),
    re.compile(r"Using '?(?P<kernel>[\w.]+)'? (?P<layer>Fp8|NvFp4|WNA16|Int8|Unquantized) MoE backend"),
)
_MARLIN_FALLBACK = re.compile(r"Weight-only (FP8|FP4) compression will be used leveraging the Marlin kernel")
_NVFP4_EMULATION = "NVFP4 linear falling back to the slow and unoptimized emulation backend"
_WEIGHT_ONLY = re.compile(r"Marlin|Machete|Exllama|Conch|TritonW4A16|W4A16|Humming|WNA16", re.IGNORECASE)


@dataclass(frozen=True)
class KernelChoice:
    """One kernel (or MoE backend) vLLM chose, for one kind of layer, and what it means on that device."""

    kernel: str
    layer: str  # the scheme class ("CompressedTensorsW8A8Fp8"), "NVFP4 GEMM", or "<format> MoE"
    mode: SupportMode
    meaning: str

    @property
    def text(self) -> str:
        return f"{self.kernel} for {self.layer} ({self.meaning})"


def classify(kernel: str, layer: str, device_kind: str) -> tuple[SupportMode, str]:
    """What one kernel name means on a device ("cpu" or "cuda"): by the layer's format first (a FlashInfer or
    CUTLASS kernel is FP4 only on an NVFP4 layer), then by the kernel's family."""
    if "Emulation" in kernel or kernel.upper() == "EMULATION":
        return SupportMode.EMULATED, "emulation: the format's maths done in generic PyTorch"
    if device_kind == "cpu":
        if "Torch" in kernel:
            return SupportMode.EMULATED, "torch._scaled_mm on a CPU: FP8 emulated"
        return SupportMode.NATIVE, "a kernel vLLM built for this CPU"
    if _WEIGHT_ONLY.search(kernel) or "WNA16" in layer:
        return SupportMode.WEIGHT_ONLY, "weight-only: weights dequantized inside the kernel, BF16 maths"
    if "NVFP4" in layer or "NvFp4" in layer:
        return SupportMode.NATIVE, "FP4 tensor cores"
    if "Int8" in layer or "Int8" in kernel:
        return SupportMode.NATIVE, "int8 tensor cores"
    if "Fp8" in layer or "FP8" in layer or "FP8" in kernel:
        return SupportMode.NATIVE, "FP8 tensor cores (torch._scaled_mm / CUTLASS / FlashInfer)"
    if "Unquantized" in layer:
        return SupportMode.NATIVE, "dense experts in the served dtype"
    return SupportMode.NATIVE, "native CUDA kernel"


def parse_log(text: str, device_kind: str) -> tuple[KernelChoice, ...]:
    """Every kernel line vLLM wrote, in order, once each; the Marlin and emulation fallbacks as choices too."""
    seen: dict[tuple[str, str], KernelChoice] = {}
    for pattern in _LINES:
        for match in pattern.finditer(text):
            kernel, layer = match["kernel"], match["layer"]
            if pattern is _LINES[2]:
                layer = f"{layer} MoE"
            elif layer == "mixed-precision linear":  # the selector's line for the same W4A16 layers
                layer = "CompressedTensorsWNA16"
            mode, meaning = classify(kernel, layer, device_kind)
            seen.setdefault((kernel, layer), KernelChoice(kernel, layer, mode, meaning))
    for match in _MARLIN_FALLBACK.finditer(text):
        key = (f"Marlin{match[1]}", f"{match[1]} linear (no native {match[1]} on this GPU)")
        seen.setdefault(key, KernelChoice(*key, SupportMode.WEIGHT_ONLY,
                                          "weight-only: weights dequantized inside the kernel, BF16 maths"))
    if _NVFP4_EMULATION in text:
        key = ("Emulation", "NVFP4 GEMM")
        seen.setdefault(key, KernelChoice(*key, SupportMode.EMULATED, "emulation: no optimized NVFP4 backend"))
    return tuple(seen.values())


def describe(choices: tuple[KernelChoice, ...], quantization: str | None) -> str:
    """The kernel path in one line, for the record and the screens."""
    if choices:
        return "; ".join(choice.text for choice in choices)
    if quantization in (None, "None"):
        return "unquantized (dense matmuls in the served dtype)"
    return f"quantization={quantization} (vLLM named no kernel)"


def quantization_method(text: str) -> str | None:
    found = re.search(r"quantization=([\w-]+)", text)
    return found.group(1) if found else None


def served_dtype(text: str) -> str | None:
    """The dtype vLLM's engine runs in, from its start line ("... dtype=torch.bfloat16, ..."; ``v1/engine/core.py``
    l. 133, the config's ``__str__`` in ``config/vllm.py`` l. 2713)."""
    found = re.search(r"dtype=torch\.(\w+)", text)
    return found.group(1) if found else None


def mode_of(choices: tuple[KernelChoice, ...], planned: SupportMode, precision: Precision) -> SupportMode:
    """The label follows the kernels vLLM chose: any emulation makes the whole artifact emulated; a weight-only
    kernel for a format that quantizes activations (FP8, INT8 W8A8, NVFP4 W4A4) makes it "weight-only" - served
    with its activations in BF16 - while for a weight-only format (W4A16, NVFP4A16) it is the native path.
    Without a named kernel the plan stands."""
    if not choices:
        return planned
    modes = {choice.mode for choice in choices}
    if SupportMode.EMULATED in modes:
        return SupportMode.EMULATED
    if SupportMode.WEIGHT_ONLY in modes and precision.quantizes_activations:
        return SupportMode.WEIGHT_ONLY
    return SupportMode.NATIVE


def expected(precision: Precision, device_kind: str, compute_capability: tuple[int, int] | None) -> str:
    """The kernel vLLM 0.32 is expected to pick for this precision's linear layers on this device, following
    its selection order (``linear/__init__.py`` l. 431-591, 865-923, 1128-1240) - shown in the plan, compared
    with what the job's log says."""
    cc = compute_capability or (0, 0)
    key, cpu = precision.key, device_kind != "cuda"
    if not precision.quantized:
        return "unquantized: dense matmuls in the served dtype"
    if key == "fp8":
        if cpu:
            return "ChannelWiseTorchFP8ScaledMMLinearKernel (emulated; CPUFP8W8A8 with AMX-FP8)"
        return ("CutlassFP8ScaledMMLinearKernel (FP8 tensor cores)" if cc >= (8, 9)
                else "Marlin FP8, weight-only (W8A16): no FP8 tensor cores below CC 8.9")
    if key == "int8":
        return "CPUInt8ScaledMMLinearKernel (oneDNN)" if cpu else "CutlassInt8ScaledMMLinearKernel (int8 tensor cores)"
    if precision.scheme is None:  # W4A16 groups: RTN, AWQ, GPTQ
        if cpu:
            return "CPUWNA16LinearKernel (AVX-512 builds only)"
        if cc == (9, 0):
            return "MacheteLinearKernel (weight-only, Hopper)"
        return "MarlinLinearKernel (weight-only)" if cc >= (7, 5) else "ExllamaLinearKernel (weight-only)"
    if key in ("nvfp4a16", "nvfp4"):
        if cpu:
            return "none: vLLM has no NVFP4 kernel on a CPU"
        if cc < (7, 5):
            return "Emulation (no FP4 Marlin below CC 7.5)"
        if key == "nvfp4a16" or cc < (10, 0):
            if key == "nvfp4a16" and cc in ((10, 0), (10, 3)):
                return "FlashInferCuteDslNvFp4W4A16LinearKernel (weight-only)"
            served = "" if key == "nvfp4a16" else ": activations not quantized"
            # on CC 9.0 vLLM prefers Humming when its package is installed (quantization/utils/humming/priority.py)
            humming = " or HummingLinearKernel" if cc == (9, 0) else ""
            return f"MarlinNvFp4LinearKernel{humming} (weight-only{served})"
        if cc >= (12, 0):
            return "FlashInferCutlassNvFp4LinearKernel (FP4 tensor cores; Marlin if FlashInfer is absent)"
        return "FlashInferCuteDsl NVFP4 kernel (FP4 tensor cores)"
    return "chosen by vLLM at start"


def mismatch(expected_text: str, picked_text: str) -> str | None:
    """Where the linear-layer kernel the plan expected is not one vLLM logged: one sentence; None when they agree
    (or nothing was expected / named). MoE backend lines are vLLM's own choice and never a mismatch."""
    if not expected_text or not picked_text or expected_text.startswith(("chosen by vLLM", "none:")):
        return None
    linear = [part for part in picked_text.split("; ") if " MoE (" not in part]
    if not linear or linear[0].startswith(("quantization=", "unquantized")):
        if expected_text.startswith("unquantized") or (linear and linear[0].startswith("quantization=")):
            return None
        return f"the plan expected {expected_text.split(' (')[0]}; vLLM named no linear kernel"
    picked = linear[0].split(" (")[0]
    if expected_text.startswith("unquantized"):
        return f"the plan expected dense matmuls; vLLM logged {picked}"
    names = [name.split()[0] for name in expected_text.split(" (")[0].split(" or ")]
    return None if any(name in "; ".join(linear) for name in names) else \
        f"the plan expected {' or '.join(names)}; vLLM logged {picked}"
