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

from qexplorer.core.kinds import Engine, Family, Producer, SupportMode, TensorRole
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
    scheme: str | None = None  # llm-compressor preset scheme (FP8_DYNAMIC, W8A8, NVFP4A16, NVFP4); None: W4A16 groups
    fixed_group_size: int | None = None  # NVFP4: one FP8 scale per 16 weights, whatever the row length
    vllm_cpu_gap: str | None = None  # why vLLM's CPU build cannot serve it usefully (then: transformers fallback)
    below_min_cc: SupportMode = SupportMode.EMULATED  # how vLLM serves it below min_cc

    @property
    def quantizes_activations(self) -> bool:
        """FP8 dynamic, INT8 W8A8 and NVFP4 W4A4 quantize activations too; a weight-only kernel drops that."""
        return self.scheme in ("FP8_DYNAMIC", "W8A8", "NVFP4")

    @property
    def is_gguf(self) -> bool:
        return self.family == Family.GGUF

    @property
    def engine(self) -> Engine:
        """The engine that serves this precision's artifact (vLLM for Hugging Face formats, llama.cpp for GGUF)."""
        return Engine.LLAMA_CPP if self.is_gguf else Engine.VLLM

    def group_size(self, spec: ModelSpec) -> int | None:
        """Largest standard group size that divides every quantized row (576 → 64)."""
        if not self.scale_bits_per_group:
            return None
        if self.fixed_group_size:
            return self.fixed_group_size
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
            return Support(self.below_min_cc, self.gpu_fallback_note)
        return Support(SupportMode.NATIVE, self.native_note or "CUDA")


def _quantized_role(group: TensorGroup, spec: ModelSpec) -> bool:
    """Linear layers and experts are quantized; a MoE's routers are not (torch_quant.KEEP_BF16): the router
    (n_experts rows) and Qwen2-MoE's shared-expert gate (one row)."""
    if group.role == TensorRole.EXPERT:
        return True
    return group.role == TensorRole.LINEAR and not (spec.n_experts and group.rows in (spec.n_experts, 1))


def _gguf(key: str, mix_bits: float, fallback_bits: float, description: str) -> Precision:
    name = key.upper()
    return Precision(
        key=key, label=f"GGUF {name}", family=Family.GGUF, producer=Producer.LLAMA_QUANTIZE, method="llama.cpp quantize", weight_bits=mix_bits,
        description=description, servers=("llama.cpp",), gguf_type=name, gguf_fallback_bits=fallback_bits,
    )


_TORCH_INT4_GPU = "vLLM's Marlin / Machete INT4 kernels need CC ≥ 8.0; older GPUs have none"
_W4A16_CPU = ("vLLM-CPU's AVX-512 build serves W4A16 (30 tok/s measured on the bundled model); its AVX2 build "
              "has no W4A16 kernel and fails at the first forward (then: the transformers fallback)")
_CT = "a compressed-tensors folder (llm-compressor) that `vllm serve` loads"
PRECISIONS: tuple[Precision, ...] = (
    Precision("fp32", "FP32", Family.TORCH, Producer.CAST, "cast", 32.0, "full precision; the slowest reference",
              ("vLLM", "transformers"), quantized=False, native_note="CUDA"),
    Precision("bf16", "BF16", Family.TORCH, Producer.CAST, "cast", 16.0, "the usual full-precision reference",
              ("vLLM", "transformers"), quantized=False, min_cc=(8, 0), native_note="BF16 tensor cores",
              gpu_fallback_note="no BF16 tensor cores below CC 8.0"),
    Precision("fp16", "FP16", Family.TORCH, Producer.CAST, "cast", 16.0, "half precision", ("vLLM", "transformers"),
              quantized=False, native_note="FP16 tensor cores"),
    Precision("fp8", "FP8", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor FP8_DYNAMIC", 8.0,
              f"FP8 weights and dynamic per-token FP8 activations; {_CT}", ("vLLM",), scheme="FP8_DYNAMIC",
              min_cc=(8, 9), native_note="FP8 tensor cores (CC ≥ 8.9)",
              gpu_fallback_note="served weight-only below CC 8.9: vLLM runs FP8 weights through Marlin (W8A16), "
                                "activations not quantized", below_min_cc=SupportMode.WEIGHT_ONLY,
              cpu=SupportMode.EMULATED, cpu_note="emulated on CPU: vLLM upcasts FP8 for each matmul (slow)",
              vllm_cpu_gap="vLLM only emulates FP8 on a CPU (ChannelWiseTorchFP8ScaledMMLinearKernel: 0.1 tok/s "
                           "decode measured on 2 cores), which is no serving speed"),
    Precision("int8", "INT8 W8A8", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor W8A8", 8.0,
              f"int8 weights per channel and dynamic per-token int8 activations; {_CT}", ("vLLM",), scheme="W8A8",
              native_note="int8 tensor cores", cpu=SupportMode.NATIVE,
              cpu_note="vLLM's CPU build has int8 W8A8 kernels (oneDNN)"),
    Precision("int4_rtn", "INT4 RTN", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor W4A16 round-to-nearest",
              4.0, f"quarter of BF16's memory; no calibration, largest INT4 error; {_CT}", ("vLLM",),
              min_cc=(8, 0), gpu_fallback_note=_TORCH_INT4_GPU, scale_bits_per_group=16,
              cpu=SupportMode.EMULATED, cpu_note=_W4A16_CPU),
    Precision("awq", "AWQ INT4", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor AWQ W4A16", 4.0,
              f"activation-aware INT4: half of FP8's memory, better than RTN; {_CT}", ("vLLM",),
              min_cc=(8, 0), gpu_fallback_note=_TORCH_INT4_GPU, scale_bits_per_group=20,
              needs_calibration=True, cpu=SupportMode.EMULATED,
              cpu_note=f"{_W4A16_CPU}; calibration is slow on CPU (about 2 min for 135M parameters on 2 cores)"),
    Precision("gptq", "GPTQ INT4", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor GPTQ W4A16", 4.0,
              f"second-order INT4: calibrated, better than RTN; {_CT}", ("vLLM",),
              min_cc=(8, 0), gpu_fallback_note=_TORCH_INT4_GPU, scale_bits_per_group=16,
              needs_calibration=True, cpu=SupportMode.EMULATED, cpu_note=_W4A16_CPU),
    Precision("nvfp4a16", "NVFP4A16", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor NVFP4A16", 4.0,
              "FP4 (E2M1) weights with an FP8 scale per 16 and a global scale, BF16 activations: weight-only, "
              f"a quarter of BF16's memory; {_CT}", ("vLLM",), scheme="NVFP4A16",
              scale_bits_per_group=8, fixed_group_size=16, min_cc=(7, 5),
              # vLLM forces FP4-Marlin for W4A16 on every CC but 9.0 / 10.x (model_executor/kernels/linear/
              # __init__.py l. 1174-1185, vLLM 0.32): never the FP4 tensor cores, on a GB10 neither
              native_note="weight-only (FP4-Marlin: FP4 weights dequantized in the kernel, BF16 maths), CC ≥ 7.5",
              gpu_fallback_note="no FP4-Marlin kernel below CC 7.5: vLLM's NVFP4 emulation backend",
              cpu=SupportMode.EMULATED, cpu_note="no FP4 kernel on CPU: weights dequantized",
              vllm_cpu_gap="vLLM has no NVFP4 kernel on a CPU (FP4 needs a GPU; native on CC ≥ 10)"),
    Precision("nvfp4", "NVFP4 W4A4", Family.TORCH, Producer.LLMCOMPRESSOR, "llm-compressor NVFP4 (calibrated)", 4.0,
              "FP4 weights and FP4 activations (global activation scales from calibration); "
              f"{_CT}", ("vLLM",), scheme="NVFP4", scale_bits_per_group=8, fixed_group_size=16, min_cc=(10, 0),
              native_note="FP4 tensor cores (CC ≥ 10; FlashInfer CUTLASS on CC 12.x)", needs_calibration=True,
              gpu_fallback_note="served weight-only below CC 10: vLLM runs FP4-Marlin, activations not quantized "
                                "(its quality is measured on the W4A4 artifact in transformers)",
              below_min_cc=SupportMode.WEIGHT_ONLY,
              cpu=SupportMode.EMULATED, cpu_note="no FP4 kernel on CPU: emulated",
              vllm_cpu_gap="vLLM has no NVFP4 kernel on a CPU (FP4 needs a GPU; native on CC ≥ 10)"),
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
