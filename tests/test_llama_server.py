"""llama-server as the GGUF load sweep starts it: the exact command, finding the binary, and the child's life
(start, /health, stop, failure, cancel) on fake servers written here; then the real binary that set-up builds,
on the bundled model."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from qexplorer.core.domain.events import Cancelled
from qexplorer.core.errors import UserError
from qexplorer.core.serving import llama_server
from qexplorer.core.serving.llama_server import (
    NOT_INSTALLED,
    LlamaServer,
    LlamaServerSettings,
    find_llama_server,
    require_llama_server,
)

# A stand-in for llama-server: answers /health 503 for the first FAKE_LOADING requests (as llama-server does while
# it loads the model), then 200; FAKE_MODE=exit fails at once, =ignore-term shrugs off SIGTERM.
FAKE_SERVER = """
import http.server, os, signal, sys

mode = {mode!r}
loading = {loading}
print("fake llama-server", " ".join(sys.argv[1:]), flush=True)
if mode == "exit":
    print("llama_model_load: error loading model: tensor 'blk.0' has wrong shape", flush=True)
    print("main: exiting due to model loading error", flush=True)
    sys.exit(1)

def on_term(*_):
    print("got SIGTERM", flush=True)
    if mode != "ignore-term":
        os._exit(0)

signal.signal(signal.SIGTERM, on_term)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global loading
        if self.path == "/health" and loading > 0:
            loading -= 1
            self.send_response(503)
        else:
            self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def fake_binary(tmp_path: Path, mode: str = "serve", loading: int = 2) -> Path:
    path = tmp_path / "bin" / "llama-server"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n" + FAKE_SERVER.format(mode=mode, loading=loading))
    path.chmod(0o755)
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model-Q4_K_M.gguf"
    path.write_bytes(b"GGUF")
    return path


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# the command --------------------------------------------------------------------------------------------------


def test_the_command_is_llama_servers_own_flags_with_the_context_split_across_slots() -> None:
    settings = LlamaServerSettings(Path("/models/smol.gguf"), parallel=4, ctx_per_slot=2048, threads=2,
                                   n_gpu_layers=99, flash_attn="on")
    assert settings.argv(Path("/venv/bin/llama-server"), "127.0.0.1", 8099) == (
        "/venv/bin/llama-server", "-m", "/models/smol.gguf", "--host", "127.0.0.1", "--port", "8099",
        "-np", "4", "-c", "8192", "-t", "2", "-ngl", "99", "-fa", "on", "--metrics", "--no-webui",
    )
    assert settings.serve_command == (
        "llama-server -m /models/smol.gguf -np 4 -c 8192 -t 2 -ngl 99 -fa on --metrics --no-webui")


def test_defaults_leave_threads_to_llama_cpp_offload_everything_and_pass_extra_args_last() -> None:
    settings = LlamaServerSettings(Path("/m.gguf"), metrics=False, extra_args=("--seed", "1"))
    assert settings.argv("llama-server", "127.0.0.1", 1)[7:] == (
        "-np", "1", "-c", "4096", "-ngl", "all", "-fa", "auto", "--no-webui", "--seed", "1")


@pytest.mark.parametrize("field", ["parallel", "ctx_per_slot", "threads"])
def test_a_nonpositive_count_is_refused_in_one_sentence(field: str) -> None:
    with pytest.raises(UserError) as caught:
        LlamaServerSettings(Path("/m.gguf"), **{field: 0})
    assert "not 0" in str(caught.value) and str(caught.value).endswith(".") and "\n" not in str(caught.value)


# finding the binary --------------------------------------------------------------------------------------------


def test_the_environment_variable_comes_before_the_environments_own_and_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = fake_binary(tmp_path / "named")
    own = fake_binary(tmp_path / "prefix")
    on_path = fake_binary(tmp_path / "path")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    env = {"PATH": str(on_path.parent)}
    assert find_llama_server({**env, "QEXPLORER_LLAMA_SERVER": str(named)}) == named
    assert find_llama_server(env) == own
    own.unlink()
    assert find_llama_server(env) == on_path
    assert find_llama_server({"PATH": str(tmp_path / "nothing")}) is None


def test_no_binary_anywhere_says_where_it_comes_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(UserError) as caught:
        require_llama_server({"PATH": str(tmp_path)})
    assert str(caught.value) == NOT_INSTALLED


def test_a_variable_that_names_nothing_is_said_not_silently_passed_over(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"QEXPLORER_LLAMA_SERVER=.*/missing is not an executable file"):
        require_llama_server({"QEXPLORER_LLAMA_SERVER": str(tmp_path / "missing"), "PATH": ""})


# the child's life ----------------------------------------------------------------------------------------------


def test_start_waits_through_503_until_healthy_and_stop_ends_the_process(tmp_path: Path, model: Path) -> None:
    import httpx

    server = LlamaServer(LlamaServerSettings(model, parallel=2), tmp_path / "logs", binary=fake_binary(tmp_path))
    with server:
        url = server.start(timeout_s=30)
        assert url == server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{url}/health", trust_env=False).status_code == 200
        pid = server.pid
        assert pid is not None and not gone(pid)
    assert gone(pid)
    assert server.proc is not None and server.proc.returncode == 0
    log = server.log_text()
    assert f"-m {model} --host 127.0.0.1 --port {server.port} -np 2 -c 8192" in log
    assert "got SIGTERM" in log


def test_a_server_that_exits_at_once_fails_with_its_log_tail(tmp_path: Path, model: Path) -> None:
    server = LlamaServer(LlamaServerSettings(model), tmp_path / "logs", binary=fake_binary(tmp_path, "exit"))
    with pytest.raises(UserError) as caught:
        server.start(timeout_s=30)
    message = str(caught.value)
    first, *tail = message.splitlines()
    assert first.startswith(f"llama-server stopped while loading {model.name} (exit code 1); the end of its log")
    assert tail[-2:] == ["  llama_model_load: error loading model: tensor 'blk.0' has wrong shape",
                         "  main: exiting due to model loading error"]


def test_a_cancel_during_start_stops_the_server(tmp_path: Path, model: Path) -> None:
    server = LlamaServer(LlamaServerSettings(model), tmp_path / "logs", binary=fake_binary(tmp_path, loading=10**6))
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(Cancelled):
        server.start(cancel, timeout_s=60)
    assert server.pid is not None and gone(server.pid)


def test_a_server_that_never_becomes_ready_times_out_and_is_stopped(tmp_path: Path, model: Path) -> None:
    server = LlamaServer(LlamaServerSettings(model), tmp_path / "logs", binary=fake_binary(tmp_path, loading=10**6))
    with pytest.raises(UserError, match=r"did not become ready within 1 s"):
        server.start(timeout_s=1)
    assert server.pid is not None and gone(server.pid)


def test_a_server_that_ignores_sigterm_is_killed(tmp_path: Path, model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_server, "STOP_GRACE_S", 0.5)
    server = LlamaServer(LlamaServerSettings(model), tmp_path / "logs",
                         binary=fake_binary(tmp_path, "ignore-term", loading=0))
    with pytest.raises(RuntimeError, match="measuring failed"), server:
        server.start(timeout_s=30)
        raise RuntimeError("measuring failed")
    assert server.pid is not None and gone(server.pid)
    assert "got SIGTERM" in server.log_text()


def test_a_missing_model_is_refused_before_anything_starts(tmp_path: Path) -> None:
    server = LlamaServer(LlamaServerSettings(tmp_path / "nothing.gguf"), tmp_path / "logs",
                         binary=fake_binary(tmp_path))
    with pytest.raises(UserError, match="is not a GGUF file llama-server can load"):
        server.start()
    assert server.proc is None


# the real llama-server -----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_real_llama_server_serves_the_bundled_model_on_two_slots_with_metrics(tmp_path: Path) -> None:
    import httpx

    from qexplorer.core.catalog import bundled_model_path

    binary = find_llama_server()
    bundled = bundled_model_path()
    if binary is None or bundled is None:
        pytest.skip(NOT_INSTALLED if binary is None else "the bundled model is not installed")
    settings = LlamaServerSettings(bundled, parallel=2, ctx_per_slot=512, threads=2)
    with LlamaServer(settings, tmp_path, binary=binary) as server:
        url = server.start(timeout_s=120)
        pid = server.pid
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "The lighthouse keeper", "max_tokens": 8,
                                                           "temperature": 0}, timeout=120, trust_env=False)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 8
        metrics = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
        assert "llamacpp:prompt_tokens_total" in metrics and "llamacpp:requests_processing" in metrics
        assert "n_slots = 2, n_ctx_slot = 512" in server.log_text()
    assert pid is not None and gone(pid)
