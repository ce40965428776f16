"""bench-server against a real OpenAI-compatible server on loopback (llama-cpp-python's), and its faults."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from qexplorer.cli import main
from qexplorer.core import server
from qexplorer.core.catalog import bundled_model_path
from qexplorer.core.domain.bench import Stat
from qexplorer.core.domain.events import Progress, drive
from qexplorer.core.domain.record import RunRecord, ServerLevel, ServerSweep
from qexplorer.core.results import ResultsStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", "2", "--logits_all", "true", "--n_ctx", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    target = server.ServerTarget(f"http://127.0.0.1:{port}", timeout_s=2)
    while time.monotonic() < deadline:
        try:
            server.discover_model(target)
            return proc
        except server.ServerError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the loopback server did not start")


@pytest.fixture(scope="module")
def loopback():
    port = free_port()
    proc = start_server(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.e2e
def test_sweep_at_three_concurrency_levels_is_stored(loopback, capsys, isolated_user_dirs):
    assert main(["bench-server", loopback, "--concurrency", "1,4,16", "--repetitions", "1", "--max-tokens", "8",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4, 16]
    for level in data["levels"]:
        assert level["aggregate_tok_s"]["mean"] > 0 and level["ttft_s"]["mean"] > 0
        assert level["itl"]["p99_ms"] >= level["itl"]["p50_ms"] > 0
    rows = ResultsStore.in_dir(isolated_user_dirs / "data").all()
    assert rows[-1].family == "server" and rows[-1].model_path.startswith("server://127.0.0.1:")


@pytest.mark.e2e
def test_load_sweep_against_the_loopback_server(loopback, capsys):
    """llama-cpp-python's server answers one request at a time: more streams only queue, so the load sweep
    stops at saturation before its last level, and says why; it has no /metrics, which is a note."""
    assert main(["bench-server", loopback, "--load", "1,2,4,8", "--repetitions", "2", "--max-tokens", "16",
                 "--prompt-tokens", "64", "--slo-ttft-p99", "30", "--slo-itl-p99", "1000", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    levels = data["levels"]
    assert "saturated" in data["stopped_early"] and len(levels) < 4
    for level in levels:
        load = level["load"]
        assert load["errored"] == 0 and load["successful"] == 2 * level["concurrency"]
        ttft = load["time_to_first_token_ms"]
        assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] and load["output_tokens_per_second"] > 0
    assert data["goodput"][0]["concurrency"] in {lv["concurrency"] for lv in levels}
    assert "/metrics" in data["metrics_note"]


@pytest.mark.e2e
def test_unique_prompts_measure_prompt_processing_not_the_cache(loopback):
    """llama-cpp-python's server reuses the longest cached prefix: the same prompt twice is answered from the
    cache. Unique prompts (the default) must cost a real prefill, clearly above the cached TTFT."""
    target = server.ServerTarget(loopback, timeout_s=120)
    unique = drive(server.sweep(target, (1,), repetitions=3, max_tokens=8, prompt_tokens=256))
    cached = drive(server.sweep(target, (1,), repetitions=3, max_tokens=8, prompt_tokens=256, unique=False))
    fresh, hit = unique.levels[0], cached.levels[0]
    assert fresh.ttft_s.mean > 2 * hit.ttft_s.mean, (fresh.ttft_s, hit.ttft_s)
    assert unique.unique_prompts and not cached.unique_prompts
    # llama-benchy's figures, with the prompt length as the server counted it (calibrated, within 20 %)
    assert fresh.pp_tok_s.mean > 0 and fresh.tg_tok_s.mean > 0 and fresh.est_ppt_s.mean <= fresh.ttfr_s.mean
    assert abs(fresh.prompt_tokens - 256) < 0.2 * 256
    assert unique.latency_ms > 0 and "min_tokens" in unique.exact_output


@pytest.mark.e2e
def test_bench_server_depths_memory_and_noise(loopback, capsys, isolated_user_dirs):
    import psutil

    assert main(["bench-server", loopback, "--concurrency", "1", "--repetitions", "2", "--max-tokens", "16",
                 "--prompt-tokens", "64", "--depth", "0,512", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(lv["depth"], lv["concurrency"]) for lv in data["levels"]] == [(0, 1), (512, 1)]
    shallow, deep = data["levels"]
    for level in data["levels"]:
        assert level["pp_tok_s"]["mean"] > 0 and level["tg_tok_s"]["mean"] > 0
        assert level["ttfr_s"]["mean"] > 0 and level["est_ppt_s"]["mean"] > 0 and level["noise"] is not None
    # 512 more tokens to prefill: the deep request's time to first response is longer
    assert deep["ttfr_s"]["mean"] > shallow["ttfr_s"]["mean"]
    process = data["process"]  # the loopback server runs here: found from its port, its RSS sampled
    assert "llama_cpp.server" in " ".join(psutil.Process(process["pid"]).cmdline())
    assert process["peak_rss_bytes"] > 50 * 2**20
    stored = ResultsStore.in_dir(isolated_user_dirs / "data").all()[-1].record
    assert stored.memory.peak_rss_bytes == process["peak_rss_bytes"]
    assert [s.depth for s in (stored.speed, *stored.depth_speeds)] == [0, 512]


@pytest.mark.e2e
def test_quality_through_the_server(loopback, capsys):
    assert main(["bench-server", loopback, "--concurrency", "1", "--repetitions", "1", "--max-tokens", "8",
                 "--quality", "default", "--quality-tokens", "1024", "--json"]) == 0
    quality = json.loads(capsys.readouterr().out)["quality"]
    # the server runs the very Q4_1 file the BF16 reference was dequantized from: close, not identical
    assert quality["kld_mean"] < 0.05 and quality["same_top1_pct"] > 85
    assert "lower bound" in quality["approximation"]
    assert quality["logprob_alignment"].startswith("shifted")  # llama-cpp-python's own convention, read from it


@pytest.mark.e2e
def test_server_killed_mid_sweep_keeps_finished_levels(capsys, isolated_user_dirs):
    port = free_port()
    proc = start_server(port)
    url = f"http://127.0.0.1:{port}"

    def kill_later():
        # wait until the first level is done, then take the server away
        while not (isolated_user_dirs / "progress").exists():
            time.sleep(0.05)
        proc.kill()

    killer = threading.Thread(target=kill_later, daemon=True)
    killer.start()
    steps = server.sweep(server.ServerTarget(url, timeout_s=60), (1, 4), repetitions=1, max_tokens=8)
    try:
        while True:
            try:
                event = next(steps)
            except StopIteration as done:
                result = done.value
                break
            if isinstance(event, Progress) and event.done == 1:
                (isolated_user_dirs / "progress").write_text("1")
                killer.join(timeout=10)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert [lv.concurrency for lv in result.levels] == [1]
    assert "Nothing answers" in result.error or "broke off" in result.error


def test_refused_connection_is_one_sentence(capsys):
    assert main(["bench-server", f"http://127.0.0.1:{free_port()}", "--repetitions", "1"]) == 2
    err = capsys.readouterr().err
    assert "Nothing answers at" in err and err.count("\n") == 1


class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "malformed"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.mode == "http500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"data": [{"id": "fake"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.mode == "strict":  # an OpenAI-like server that refuses fields it does not know
            if "ignore_eos" in body or "min_tokens" in body:
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b'{"error": "unknown field ignore_eos"}')
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for _ in range(3):  # fewer tokens than asked for: nothing holds the length
                self.wfile.write(b'data: {"choices": [{"text": "a"}]}\n\n')
            self.wfile.write(b"data: [DONE]\n\n")
            return
        if self.mode == "hang":
            time.sleep(3)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"data: {not json at all\n\n")
        except BrokenPipeError:  # the client gave up first (the timeout case)
            pass


@contextlib.contextmanager
def fake_server(mode: str):
    """A local HTTP server answering as ``_Handler`` in ``mode``; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"mode": mode}))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.mark.parametrize(("mode", "message"), [("malformed", "malformed stream chunk"),
                                               ("http500", "answered HTTP 500"),
                                               ("hang", "did not answer within 1 s")])
def test_bad_servers(mode, message, capsys):
    with fake_server(mode) as url:
        code = main(["bench-server", url, "--repetitions", "1", "--concurrency", "1", "--timeout", "1"])
        err = capsys.readouterr().err
        assert code in (1, 2) and message in err


def test_a_server_that_refuses_ignore_eos_is_asked_without_it_and_the_sweep_says_so():
    with fake_server("strict") as url:
        result = drive(server.sweep(server.ServerTarget(url, timeout_s=5), (1,), repetitions=2, max_tokens=8,
                                    prompt_tokens=16))
    assert result.error is None and result.levels[0].tokens == 6
    assert "refused ignore_eos" in result.exact_output and "3-3 tokens" in result.exact_output
    assert result.token_count.startswith("streamed chunks with text")  # no usage in this stream
    assert "4 characters per token" in result.token_count  # no usage at all: lengths are estimates, and say so


def test_api_key_comes_from_the_environment_only(monkeypatch):
    target = server.ServerTarget("http://x", api_key_env="QX_TEST_KEY")
    monkeypatch.setenv("QX_TEST_KEY", "sekret")
    assert target.headers()["Authorization"] == "Bearer sekret"
    assert "sekret" not in repr(target)
    monkeypatch.delenv("QX_TEST_KEY")
    with pytest.raises(server.ServerError, match="QX_TEST_KEY is empty"):
        target.headers()


def test_logprob_alignment_is_read_from_the_response():
    text = "the cat sat on the mat and the dog sat on the log".split()

    def tops(shift: int) -> list[dict[str, float]]:
        # entry i: a distribution that puts the token at i + shift first; the echoed token's own entry is added
        # last, as servers do
        out = []
        for i, token in enumerate(text):
            target = text[i + shift] if i + shift < len(text) else "."
            entry = {target: -0.1, "zzz": -3.0, "yyy": -4.0}
            entry.setdefault(token, -9.0)
            out.append(entry)
        return out

    assert server.logprob_alignment(text, tops(0), top_k=3) == 1  # OpenAI: entry i is P(token i | before)
    assert server.logprob_alignment(text, tops(1), top_k=3) == 0  # llama-cpp-python: entry i predicts i + 1
    noise = [{"zzz": -0.1, "yyy": -1.0, "xxx": -2.0, t: -9.0} for t in text]
    with pytest.raises(server.ServerError, match="fit neither alignment"):
        server.logprob_alignment(text, noise, top_k=3)


def test_record_tags_host_and_model():
    level = ServerLevel(concurrency=1, aggregate_tok_s=Stat(9.0, 0.0, 1), decode_tok_s_per_stream=Stat(9.0, 0.0, 1),
                        ttft_s=Stat(0.1, 0.0, 1), itl=None, tokens=8)
    record = server.record_from_sweep(ServerSweep(model_id="m", host="h:1", max_tokens=8, repetitions=1,
                                                  token_count="chunks", levels=(level,)))
    assert record.model.path == "server://h:1/m" and record.speed.decode_tok_s.mean == 9.0
    assert RunRecord.from_json(json.loads(record.dumps())) == record


@pytest.mark.e2e
async def test_add_a_server_target_from_the_run_screen(loopback, isolated_user_dirs):
    from apps import settle, sim_app

    app = sim_app("none")
    async with app.run_test(size=(110, 34)) as pilot:
        await settle(app, pilot)
        await pilot.press("j", "a")
        await pilot.press(*loopback, "enter")
        deadline = time.monotonic() + 240
        while not (app.jobs and app.jobs[0].finished) and time.monotonic() < deadline:
            await pilot.pause(0.25)
        await settle(app, pilot)
        assert app.jobs[0].status == "ok", app.jobs[0].message
        await pilot.press("c")
        await settle(app, pilot)
        assert any(row.family == "server" for row in app.compare_rows)
