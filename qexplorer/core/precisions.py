"""The registry of precisions: the one place that knows what FP8 or Q4_K_M is.

Each :class:`Precision` says how many bits a weight costs (scales and zeros
included), which tensors it leaves at higher precision, what runs it natively,
what it runs as elsewhere, and which server loads the result.

Bits per weight for GGUF types are llama.cpp's block sizes (``gguf`` package:
Q8_0 = 34 bytes / 32 weights = 8.5 bpw, Q6_K = 6.5625, Q5_0 = 5.5, Q5_1 = 6.0,
Q4_0 = 4.5) and the published whole-model mixes of the K-quant presets
(Q5_K_M 5.70, Q4_K_M 4.89, Q3_K_M 3.91, Q2_K 3.16; FACTS §2). llama.cpp's
K-quants need rows that are a multiple of 256; other rows fall back (Q6_K→Q8_0,
Q5_K→Q5_1, Q4_K→Q5_0, Q3_K/Q2_K→Q4_0), and the output matrix (the token
embedding when tied) is stored as Q6_K in every K-quant preset. Checked against
llama.cpp's quantizer on the bundled model: planned tensor bytes within 4.1 % of
the files for Q8_0 … Q2_K (tests/test_planner.py keeps the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

from qexplorer.core.kinds import Family, Producer, SupportMode, TensorRole
from qexplorer.core.model import ModelSpec, TensorGroup

QK_K = 256  # K-quant super-block: rows must be a multiple of this
INT4_GROUP_SIZES = (128, 64, 32)


@dataclass(frozen=True)
class Hardware:
    """What the target machine can run, from telemetry."""

    cuda: bool
    compute_capability: tuple[int, int] | None = None
    unified: bool = False
    name: str = "CPU"

    @property
    def label(self) -> str:
        if not self.cuda:
            return "CPU only"
        cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "?"
        return f"{self.name} (CC {cc}{', unified memory' if self.unified else ''})"


CPU_ONLY = Hardware(cuda=False)


@dataclass(frozen=True)
class Support:
    mode: SupportMode
    note: str


@dataclass(frozen=True)
class Precision:
    key: str
    label: str
    family: Family
    producer: Producer  # what makes the artifact (on CUDA where it differs, see cpu_producer)
    method: str
    weight_bits: float  # quantized linear layers (torch: before group-size overhead)
    description: str
    servers: tuple[str, ...]
    min_cc: tuple[int, int] | None = None  # native kernels need at least this compute capability
    native_note: str = ""
    cpu: SupportMode = SupportMode.NATIVE  # how it runs without CUDA
    cpu_note: str = ""
    gpu_fallback_note: str = ""  # below min_cc
    needs_calibration: bool = False
    quantized: bool = True
    scale_bits_per_group: int = 0  # torch int4: bf16 scale (+ zero) per group
    gguf_type: str | None = None  # llama.cpp ftype name
    gguf_fallback_bits: float | None = None
    cpu_producer: Producer | None = None  # a different producer without CUDA (torchao has no CPU INT4)
    export_scheme: str | None = None  # the llm-compressor preset its vLLM export is written with

    @property
    def is_gguf(self) -> bool:
        return self.family == Family.GGUF

    def producer_on(self, cuda: bool) -> Producer:
        """What makes this precision's artifact on a machine with (or without) CUDA."""
        return self.producer if cuda or self.cpu_producer is None else self.cpu_producer

    def group_size(self, spec: ModelSpec) -> int | None:
        """Largest standard group size that divides every quantized row (576 → 64)."""
        if not self.scale_bits_per_group:
            return None
        cols = {g.cols for g in spec.groups if g.role in (TensorRole.LINEAR, TensorRole.EXPERT)}
        for size in INT4_GROUP_SIZES:
            if all(c % size == 0 for c in cols):
                return size
        return None

    def bits_for(self, group: TensorGroup, spec: ModelSpec) -> float:
        """Bits per weight this precision spends on one tensor group."""
        if self.is_gguf:
            return self._gguf_bits(group, spec)
        if not self.quantized:
            return self.weight_bits
        if not _quantized_role(group, spec):
            return 16.0  # embeddings, lm_head, norms and MoE routers stay bf16
        if self.scale_bits_per_group:
            size = self.group_size(spec) or group.cols
            return self.weight_bits + self.scale_bits_per_group / size
        return self.weight_bits + 16 / group.cols  # one bf16 scale per output channel

    def _gguf_bits(self, group: TensorGroup, spec: ModelSpec) -> float:
        if group.role == TensorRole.NORM:
            return 32.0
        output = group.role == TensorRole.LM_HEAD or (group.role == TensorRole.EMBEDDING and spec.tied_embeddings)
        if self.gguf_type == "Q8_0":
            return 8.5
        if output:  # Q6_K in every K-quant preset; Q8_0 where rows are not a multiple of 256
            return 6.5625 if group.cols % QK_K == 0 else 8.5
        if group.cols % QK_K != 0:
            return self.gguf_fallback_bits or self.weight_bits
        return self.weight_bits

    def support(self, hardware: Hardware) -> Support:
        if self.is_gguf:
            where = "CUDA" if hardware.cuda else "CPU"
            return Support(SupportMode.NATIVE, f"llama.cpp on {where}")
        if not hardware.cuda:
            return Support(self.cpu, self.cpu_note or "runs on CPU")
        cc = hardware.compute_capability
        if self.min_cc and cc is not None and cc < self.min_cc:
            return Support(SupportMode.EMULATED, self.gpu_fallback_note)
        return Support(SupportMode.NATIVE, self.native_note or "CUDA")


def _quantized_role(group: TensorGroup, spec: ModelSpec) -> bool:
    """Linear layers and experts are quantized; a MoE router (n_experts rows) is not."""
    if group.role == TensorRole.EXPERT:
        return True
    return group.role == TensorRole.LINEAR and not (spec.n_experts and group.rows == spec.n_experts)


def _gguf(key: str, mix_bits: float, fallback_bits: float, description: str) -> Precision:
    name = key.upper()
    return Precision(
        key=key, label=f"GGUF {name}", family=Family.GGUF, producer=Producer.LLAMA_QUANTIZE, method="llama.cpp quantize", weight_bits=mix_bits,
        description=description, servers=("llama.cpp",), gguf_type=name, gguf_fallback_bits=fallback_bits,
    )


_TORCH_INT4_GPU = "Marlin / tinygemm INT4 kernels need CC ≥ 8.0; older GPUs dequantize in PyTorch"
PRECISIONS: tuple[Precision, ...] = (
    Precision("fp32", "FP32", Family.TORCH, Producer.CAST, "cast", 32.0, "full precision; the slowest reference",
              ("vLLM", "transformers"), quantized=False, native_note="CUDA"),
    Precision("bf16", "BF16", Family.TORCH, Producer.CAST, "cast", 16.0, "the usual full-precision reference",
              ("vLLM", "transformers"), quantized=False, min_cc=(8, 0), native_note="BF16 tensor cores",
              gpu_fallback_note="no BF16 tensor cores below CC 8.0"),
    Precision("fp16", "FP16", Family.TORCH, Producer.CAST, "cast", 16.0, "half precision", ("vLLM", "transformers"),
              quantized=False, native_note="FP16 tensor cores"),
    Precision("fp8", "FP8", Family.TORCH, Producer.TORCHAO, "torchao / llm-compressor FP8_DYNAMIC", 8.0,
              "near-lossless; no throughput penalty on FP8 tensor cores", ("vLLM",),
              min_cc=(8, 9), native_note="FP8 tensor cores (CC ≥ 8.9)", export_scheme="FP8_DYNAMIC",
              gpu_fallback_note="no FP8 tensor cores below CC 8.9: weights upcast for each matmul",
              cpu=SupportMode.EMULATED, cpu_note="emulated on CPU: FP8 weights upcast to BF16 for each matmul"),
    Precision("int8", "INT8 w-only", Family.TORCH, Producer.TORCHAO, "torchao Int8WeightOnly", 8.0,
              "half of BF16's memory, small quality loss", ("vLLM",),
              cpu=SupportMode.NATIVE, cpu_note="torchao's INT8 weight-only path runs on CPU", export_scheme="W8A16"),
    Precision("int4_rtn", "INT4 RTN", Family.TORCH, Producer.TORCHAO, "round-to-nearest W4A16", 4.0,
              "quarter of BF16's memory; no calibration, largest INT4 error", ("vLLM",),
              min_cc=(8, 0), gpu_fallback_note=_TORCH_INT4_GPU, scale_bits_per_group=32,
              cpu_producer=Producer.LLMCOMPRESSOR, cpu=SupportMode.EMULATED, cpu_note="emulated on CPU: no INT4 kernel, weights dequantized to BF16"),
    Precision("awq", "AWQ INT4", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor AWQ W4A16", 4.0,
              "activation-aware INT4: half of FP8's memory, better than RTN", ("vLLM",),
              min_cc=(8, 0), gpu_fallback_note=_TORCH_INT4_GPU, scale_bits_per_group=20,
              needs_calibration=True, cpu=SupportMode.EMULATED,
              cpu_note="emulated on CPU; calibration is slow there (about 2 min for 135M parameters on 2 cores)"),
    Precision("gptq", "GPTQ INT4", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor GPTQ W4A16", 4.0,
              "second-order INT4: calibrated, better than RTN", ("vLLM",),
              min_cc=(8, 0), gpu_fallback_note=_TORCH_INT4_GPU, scale_bits_per_group=16,
              needs_calibration=True, cpu=SupportMode.EMULATED,
              cpu_note="emulated on CPU: no INT4 kernel, weights dequantized to BF16"),
    _gguf("q8_0", 8.5, 8.5, "8-bit blocks: near-lossless GGUF"),
    _gguf("q6_k", 6.5625, 8.5, "6-bit K-quant"),
    _gguf("q5_k_m", 5.70, 6.0, "5-bit K-quant mix: CPU / hybrid sweet spot"),
    _gguf("q4_k_m", 4.89, 5.5, "4-bit K-quant mix: the usual llama.cpp choice"),
    _gguf("q3_k_m", 3.91, 4.5, "3-bit K-quant mix: quality drops"),
    _gguf("q2_k", 3.16, 4.5, "2-bit K-quant: experimental"),
)
BY_KEY = {p.key: p for p in PRECISIONS}


def get(key: str) -> Precision:
    """``get("Q4_K_M")`` -> the precision; unknown keys are one clear error."""
    from qexplorer.core.errors import UserError

    normal = key.strip().lower().replace("-", "_")
    if normal in BY_KEY:
        return BY_KEY[normal]
    raise UserError(f"Unknown precision {key!r}; choose from {', '.join(BY_KEY)}.")


def parse_list(text: str | None) -> tuple[Precision, ...]:
    """``"bf16,int8,q4_k_m"`` -> precisions; None or "all" -> every precision."""
    if not text or text == "all":
        return PRECISIONS
    return tuple(get(part) for part in text.split(",") if part.strip())
