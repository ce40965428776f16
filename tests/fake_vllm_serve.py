"""A contract fake of ``vllm serve`` on a simulated GPU, for the GPU path's tests on a machine without one.

It follows vLLM 0.32's source (paths relative to the ``vllm`` package) where the job depends on it:

* its CLI: unknown flags are an argparse error (``engine/arg_utils.py``; the real parser is checked separately);
* the start-up check (``v1/worker/utils.py`` l. 724-768): ``free < ceil(total × gpu_memory_utilization)``
  raises ``ValueError: Free memory on device ... is less than desired GPU memory utilization``, with the default
  0.92 (``config/cache.py`` l. 102); free and total are the simulated device's, read from
  ``QEXPLORER_SIMULATE_DEVICE`` as the job reads them;
* ``--dtype``: "auto" downcasts a float32 checkpoint to bfloat16 (``config/model.py`` l. 2422, 2495); the
  engine's start line names the dtype (``v1/engine/core.py`` l. 133);
* ``--enforce-eager`` disables CUDA graphs (``config/vllm.py`` l. 1691), logged;
* the kernel lines each compressed-tensors format gets on a device of that compute capability
  (``model_executor/kernels/linear/__init__.py`` l. 431-591, 798, 847, 923, 1174-1240;
  ``compressed_tensors_wNa16.py`` l. 138; ``marlin_utils_fp8.py`` l. 108; ``nvfp4/marlin.py`` l. 34);
* an OpenAI-compatible ``/health``, ``/version``, ``/v1/models`` (the ``--served-model-name``) and streamed
  ``/v1/completions`` with ``usage``;
* ``/metrics`` with the gauges a load sweep reads (``v1/metrics/loggers.py``, ``PrometheusStatLogger``):
  ``vllm:num_requests_running`` (the requests in flight), ``vllm:num_requests_waiting`` (those beyond
  ``--max-num-seqs``, which vLLM queues), ``vllm:kv_cache_usage_perc`` (running ÷ max-num-seqs, 0-1) and the
  counter ``vllm:num_preemptions_total``.

Run as ``python fake_vllm_serve.py serve MODEL --port N ...`` (the test writes a ``vllm`` wrapper that does).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from qexplorer.core.device import simulated_device

GIB = 1024**3


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm serve")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--kv-cache-memory-bytes", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float",
                                                            "float32"])
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--compilation-config", "-cc")
    parser.add_argument("--enable-prefix-caching", action="store_true")
    parser.add_argument("--no-enable-prefix-caching", action="store_true")
    parser.add_argument("--max-logprobs", type=int)
    return parser.parse_args(argv)


def kernel_lines(config: dict, cc: tuple[int, int]) -> list[str]:
    """What vLLM logs for this checkpoint's linear layers on a GPU of compute capability ``cc``."""
    q = config.get("quantization_config") or {}
    if not q:
        return []
    group = next(iter((q.get("config_groups") or {}).values()), {})
    weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
    if weights.get("type") == "float" and weights.get("num_bits") == 8:
        if cc >= (8, 9):
            return ["Selected CutlassFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8"]
        return ["Your GPU does not have native support for FP8 computation but FP8 quantization is being used. "
                "Weight-only FP8 compression will be used leveraging the Marlin kernel. This may degrade "
                "performance for compute-heavy workloads."]
    if weights.get("type") == "int" and weights.get("num_bits") == 8:
        return ["Selected CutlassInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"]
    if weights.get("type") == "int" and weights.get("num_bits") == 4:
        kernel = "MacheteLinearKernel" if cc == (9, 0) else "MarlinLinearKernel"
        return [f"Using {kernel} for mixed-precision linear", f"Using {kernel} for CompressedTensorsWNA16"]
    if weights.get("type") == "float" and weights.get("num_bits") == 4:
        weight_only = not acts
        if weight_only or cc < (10, 0):
            return ["Using MarlinNvFp4LinearKernel for NVFP4 GEMM",
                    "Your GPU does not have native support for FP4 computation but FP4 quantization is being used. "
                    "Weight-only FP4 compression will be used leveraging the Marlin kernel."]
        return ["Using FlashInferCutlassNvFp4LinearKernel for NVFP4 GEMM"]
    return []


def main(argv: list[str]) -> int:
    args = parse(argv)
    config = json.loads((Path(args.model) / "config.json").read_text())
    device = simulated_device(__import__("os").environ["QEXPLORER_SIMULATE_DEVICE"])
    log = print
    log("INFO vLLM API server version 0.32.0 (contract fake)", flush=True)
    requested = math.ceil(device.total_bytes * args.gpu_memory_utilization)
    if device.free_bytes < requested:
        log(f"(EngineCore) ERROR ValueError: Free memory on device cuda:0 ({device.free_bytes / GIB:.2f}/"
            f"{device.total_bytes / GIB:.2f} GiB) on startup is less than desired GPU memory utilization "
            f"({args.gpu_memory_utilization}, {requested / GIB:.2f} GiB). Decrease GPU memory utilization or "
            "reduce GPU memory used by other processes.", flush=True)
        return 1
    stored = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = {"half": "float16", "float": "float32"}.get(args.dtype, args.dtype)
    if dtype == "auto":
        dtype = "bfloat16" if stored == "float32" else stored
        if stored == "float32":
            log("WARNING Downcasting torch.float32 to torch.bfloat16.")
    quant = (config.get("quantization_config") or {}).get("quant_method")
    log(f"INFO Initializing a V1 LLM engine (v0.32.0) with config: model='{args.model}', dtype=torch.{dtype}, "
        f"max_seq_len={args.max_model_len}, quantization={quant}, enforce_eager={args.enforce_eager}")
    for line in kernel_lines(config, device.compute_capability or (0, 0)):
        log(f"INFO {line}")
    if args.enforce_eager:
        log("WARNING Enforce eager set, disabling torch.compile, CUDAGraphs, and JIT kernel warmup.")
    else:
        graphs = json.loads(args.compilation_config or "{}")
        log(f"INFO Graph capturing finished in 1 secs, took 0.05 GiB "
            f"(mode {graphs.get('cudagraph_mode')}, sizes {graphs.get('cudagraph_capture_sizes')})")
    sys.stdout.flush()
    serve(args)
    return 0


def serve(args: argparse.Namespace) -> None:
    import threading

    lock = threading.Lock()
    state = {"in_flight": 0}
    slots = args.max_num_seqs or 256

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def _json(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/version":
                self._json({"version": "0.32.0-contract-fake"})
            elif self.path == "/v1/models":
                self._json({"object": "list", "data": [{"id": args.served_model_name or args.model,
                                                        "object": "model", "max_model_len": args.max_model_len}]})
            elif self.path == "/metrics":
                with lock:
                    flight = state["in_flight"]
                running, waiting = min(flight, slots), max(0, flight - slots)
                text = (f"vllm:num_requests_running{{engine=\"0\"}} {running}\n"
                        f"vllm:num_requests_waiting{{engine=\"0\"}} {waiting}\n"
                        f"vllm:kv_cache_usage_perc{{engine=\"0\"}} {running / slots}\n"
                        "vllm:num_preemptions_total{engine=\"0\"} 0\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
            else:
                self.send_error(404)

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            tokens = int(body.get("max_tokens") or 1)
            if not body.get("stream"):
                self._json({"choices": [{"text": "x" * tokens}], "usage": {"completion_tokens": tokens}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            with lock:
                state["in_flight"] += 1
            try:
                for _ in range(tokens):
                    time.sleep(0.002)
                    self.wfile.write(b'data: {"choices": [{"text": "x"}]}\n\n')
                    self.wfile.flush()
                counts = {"completion_tokens": tokens}
                if isinstance(body.get("prompt"), str):  # a text prompt (a load sweep): 4 characters a token
                    counts["prompt_tokens"] = max(1, len(body["prompt"]) // 4)
                usage = json.dumps({"choices": [], "usage": counts})
                self.wfile.write(f"data: {usage}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()
            finally:
                with lock:
                    state["in_flight"] -= 1

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
