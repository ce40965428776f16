"""The closed sets of names that cross module boundaries, as ``StrEnum``.

Each one used to be a bare string documented in a comment. As ``StrEnum``
members they still compare equal to (and serialise as) their strings, so JSON
files, the results store and tests written against the strings keep working,
while the type checker follows each one to every screen and export.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"  # the memory guard ended it
    TIMEOUT = "timeout"  # a phase made no progress for too long

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class JobAction(StrEnum):
    RUN = "run"  # quantize + benchmark [+ quality]
    EXPORT = "export"  # write the servable artifact
    SERVER = "server"  # benchmark a running OpenAI-compatible server (no worker process)


class Family(StrEnum):
    TORCH = "torch"
    GGUF = "gguf"
    SERVER = "server"


class Producer(StrEnum):
    """What makes a precision's artifact: the one place pipeline, planner and export ask."""

    CAST = "cast"  # a plain checkpoint in that dtype (the BF16 checkpoint, or a cast of it)
    LLMCOMPRESSOR = "llm-compressor"  # a compressed-tensors folder (data-free or calibrated)
    LLAMA_QUANTIZE = "llama.cpp quantize"  # a .gguf file


class Engine(StrEnum):
    VLLM = "vllm"  # serves the Hugging Face precisions
    LLAMA_CPP = "llama.cpp"  # serves GGUF
    TRANSFORMERS = "transformers"  # the fallback where vLLM is absent or has no kernel: not serving speed
    OPENAI_API = "openai-api"  # a server the user runs


class SupportMode(StrEnum):
    NATIVE = "native"
    EMULATED = "emulated"
    DEQUANTIZED = "dequantized"  # transformers fallback: weights decompressed to BF16, dense matmuls
    UNAVAILABLE = "unavailable"
    SERVED = "served"  # measured through a server; how it runs there is the server's business
    # served through a weight-only kernel although the format quantizes activations (FP8 below CC 8.9, NVFP4
    # below CC 10: Marlin): the speed and numerics are W8A16 / W4A16, not the format's own
    WEIGHT_ONLY = "weight-only"


class Verdict(StrEnum):
    FITS = "fits"
    TIGHT = "tight"
    DOES_NOT_FIT = "does not fit"
    UNKNOWN = "unknown"


class TensorRole(StrEnum):
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    LINEAR = "linear"
    EXPERT = "expert"
    NORM = "norm"


class ModelFormat(StrEnum):
    GGUF = "gguf"
    HF = "hf"


class Priority(StrEnum):
    QUALITY = "quality"
    MEMORY = "memory"
    SPEED = "speed"
    CPU = "cpu"
    SERVING = "serving"  # the most output tok/s within the service objective (a load sweep's goodput)


class NvmlState(StrEnum):
    """Why GPU telemetry is (not) there; the sentence for a person travels beside it."""

    OK = "ok"
    NO_DRIVER = "no driver"  # libnvidia-ml missing or failed to initialise
    NO_GPU = "no gpu"  # NVML answered with zero devices
    LOST = "lost"  # worked, then stopped answering mid-run


class ProcessKind(StrEnum):
    COMPUTE = "compute"
    GRAPHICS = "graphics"
    COMPUTE_GRAPHICS = "C+G"  # in both of NVML's lists (nvidia-smi's name for it)


class RunsOn(StrEnum):
    GPU = "GPU"
    CPU = "CPU"
