"""bench-server --load against a fake OpenAI-compatible server whose latency grows with the requests in flight:
the goodput level is the one the fake's latency law gives by hand, the early stop fires (errors beyond its
capacity; saturation), its /metrics is read, and old sweeps still load."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from dataclasses import dataclass

import pytest

from qexplorer.cli import main
from qexplorer.core import server
from qexplorer.core.domain.bench import Stat
from qexplorer.core.domain.events import drive
from qexplorer.core.domain.load import LevelLoad, LoadPlan, Percentiles, ServiceObjective, StopRule
from qexplorer.core.domain.record import InterTokenLatency, RunRecord, ServerLevel, ServerSweep
from qexplorer.core.serial import from_jsonable, to_jsonable
from qexplorer.core.server.load import goodput, meets, stop_reason
from qexplorer.core.server.metrics import ENGINES, parse_prometheus


@dataclass(frozen=True)
class Law:
    """The fake's latency law, in seconds, for ``n`` requests in flight (the one asking included)."""

    ttft_base_s: float
    ttft_per_request_s: float
    gap_base_s: float
    gap_per_request_s: float
    capacity: int  # one more request in flight is refused with HTTP 503
    slots: int | None = None  # at most this many generate at once; the others wait (None: no limit)

    def ttft_s(self, n: int) -> float:
        return self.ttft_base_s + self.ttft_per_request_s * n

    def gap_s(self, n: int) -> float:
        return self.gap_base_s + self.gap_per_request_s * (n - 1)


# throughput grows up to the capacity (6 tokens: 17, 27, 37, 46 tok/s at 1, 2, 4, 8), the gap crosses 90 ms
# between 4 (70 ms) and 8 (110 ms) in flight, and at 16 half the requests are refused
GROWING = Law(ttft_base_s=0.10, ttft_per_request_s=0.05, gap_base_s=0.04, gap_per_request_s=0.01, capacity=8)
# one slot: every extra stream only queues, so throughput stays flat while TTFT grows with the queue
SATURATING = Law(ttft_base_s=0.10, ttft_per_request_s=0.0, gap_base_s=0.03, gap_per_request_s=0.0, capacity=64,
                 slots=1)
TOKENS = 6


class _LoadHandler(http.server.BaseHTTPRequestHandler):
    law: Law = GROWING
    metrics = True
    disable_nagle_algorithm = True  # each token leaves when written, so the client times the law, not Nagle
    state: dict

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, json.dumps({"data": [{"id": "fake-load"}]}).encode())
        elif self.path == "/metrics" and self.metrics:
            s = self.state
            with s["lock"]:  # vLLM's names (vllm/v1/metrics/loggers.py), with a label as vLLM writes them
                text = "\n".join([
                    "# TYPE vllm:num_requests_running gauge",
                    f'vllm:num_requests_running{{model_name="fake-load",engine="0"}} {s["in_flight"] - s["waiting"]}',
                    f'vllm:num_requests_waiting{{model_name="fake-load",engine="0"}} {s["waiting"]}',
                    f'vllm:kv_cache_usage_perc{{model_name="fake-load",engine="0"}} {s["in_flight"] / 16}',
                    f'vllm:num_preemptions_total{{model_name="fake-load",engine="0"}} {s["refused"]}.0',
                    f'vllm:request_prefill_time_seconds_sum{{model_name="fake-load",engine="0"}} {s["ttft_sum"]}',
                    f'vllm:request_prefill_time_seconds_count{{model_name="fake-load",engine="0"}} {s["done"]}.0',
                    ""])
            self._send(200, text.encode(), "text/plain; version=0.0.4")
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        s, law = self.state, self.law
        with s["lock"]:
            if s["in_flight"] >= law.capacity:
                s["refused"] += 1
                refused = True
            else:
                s["in_flight"] += 1
                n = s["in_flight"]
                refused = False
        if refused:
            self._send(503, b'{"error": "server at capacity"}')
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if law.slots is not None:
                with s["lock"]:
                    s["waiting"] += 1
                s["slots"].acquire()
                with s["lock"]:
                    s["waiting"] -= 1
            ttft = law.ttft_s(n)
            time.sleep(ttft)
            tokens = int(body.get("max_tokens", 1))
            for index in range(tokens):
                if index:
                    with s["lock"]:
                        current = s["in_flight"]
                    time.sleep(law.gap_s(current))
                self.wfile.write(b'data: {"choices": [{"text": " x"}]}\n\n')
            with s["lock"]:  # counted before [DONE], so the level's last scrape sees it
                s["ttft_sum"] += ttft
                s["done"] += 1
            usage = {"prompt_tokens": max(1, len(body.get("prompt", "")) // 4), "completion_tokens": tokens}
            self.wfile.write(f'data: {{"choices": [], "usage": {json.dumps(usage)}}}\n\n'.encode())
            self.wfile.write(b"data: [DONE]\n\n")
        finally:
            if law.slots is not None:
                s["slots"].release()
            with s["lock"]:
                s["in_flight"] -= 1


@contextlib.contextmanager
def load_server(law: Law, metrics: bool = True):
    state = {"lock": threading.Lock(), "in_flight": 0, "waiting": 0, "refused": 0, "ttft_sum": 0.0, "done": 0,
             "slots": threading.Semaphore(law.slots or 1)}
    handler = type("H", (_LoadHandler,), {"law": law, "metrics": metrics, "state": state})
    # a listen backlog of 5 (the default) drops the SYNs of a burst of 16, which then arrive a second late
    server_class = type("S", (http.server.ThreadingHTTPServer,), {"request_queue_size": 128})
    httpd = server_class(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def by_hand(law: Law, levels: tuple[int, ...], objective: ServiceObjective) -> int | None:
    """The goodput level from the law alone: the last arrival of a level sees all its admitted requests in
    flight (TTFT p99 is the largest), and every gap while all are in flight is the largest (ITL p99)."""
    passing = []
    for c in levels:
        admitted = min(c, law.capacity)
        error_rate = (c - admitted) / c
        if (law.ttft_s(admitted) <= objective.ttft_p99_s and 1000 * law.gap_s(admitted) <= objective.itl_p99_ms
                and error_rate <= objective.max_error_rate):
            passing.append(c)
    return max(passing) if passing else None


def test_goodput_is_the_hand_computed_level_and_errors_stop_the_sweep():
    objective = ServiceObjective(ttft_p99_s=2.0, itl_p99_ms=90.0)
    levels = (1, 2, 4, 8, 16, 32)
    expected = by_hand(GROWING, levels, objective)
    assert expected == 4  # 70 ms gaps at 4 in flight, 110 ms at 8
    with load_server(GROWING) as url:
        result = drive(server.sweep(server.ServerTarget(url, timeout_s=20), levels, repetitions=1,
                                    max_tokens=TOKENS, prompt_tokens=16, text="lorem ipsum dolor " * 200,
                                    load=LoadPlan(objective=objective, metrics_interval_s=0.1)))
    assert result.error is None
    # the early stop: at 16, 8 of 16 requests are refused (50 % >= 10 %); 32 is never run
    assert [lv.concurrency for lv in result.levels] == [1, 2, 4, 8, 16]
    assert result.stopped_early.startswith("stopped after concurrency 16: 8 of 16 requests failed")
    assert "HTTP 503" in result.stopped_early and "concurrency 32 not run" in result.stopped_early
    (good,) = result.goodput
    assert good.concurrency == expected
    at = {lv.concurrency: lv for lv in result.levels}
    assert good.output_tokens_per_second == at[4].load.output_tokens_per_second
    assert good.sentence.startswith(f"serves 4 streams at {good.output_tokens_per_second:.1f} tok/s total")
    assert "TTFT p99 ≤ 2 s, ITL p99 ≤ 90 ms" in good.sentence
    # the measured figures follow the law (the client sees a little more than the server sleeps)
    for c in (1, 2, 4, 8):
        load = at[c].load
        assert load.errored == 0 and load.successful == c
        assert 1000 * GROWING.gap_s(c) - 5 < load.inter_token_latency_ms.p50 < 1000 * GROWING.gap_s(c) + 30
        assert load.time_to_first_token_ms.p99 >= 1000 * GROWING.ttft_s(c) - 5
        # the law with every stream at the last arrival's TTFT and the full gap throughout: a floor, which the
        # earlier arrivals and the shorter gaps after the first streams end lift by at most a third
        law_tok_s = c * TOKENS / (GROWING.ttft_s(c) + (TOKENS - 1) * GROWING.gap_s(c))
        assert 0.6 * law_tok_s < load.output_tokens_per_second < 1.35 * law_tok_s
    tok_s = [at[c].load.output_tokens_per_second for c in (1, 2, 4, 8)]
    assert tok_s == sorted(tok_s)  # the law's throughput grows up to the capacity: no saturation stop before 16
    assert at[16].load.errored == 8 and at[16].load.successful == 8
    assert meets(at[4], objective) and not meets(at[8], objective) and not meets(at[16], objective)
    # the server's own view, from its /metrics during each level
    m4, m8, m16 = at[4].server_metrics, at[8].server_metrics, at[16].server_metrics
    assert m4.engine == "vLLM" and m4.samples >= 3
    assert m4.running_max == 4 and m8.running_max == 8 and m8.kv_cache_usage_peak_pct == 50.0
    assert m4.preemptions == 0 and m16.preemptions == 8  # the fake counts refusals as preemptions
    # prefill per request = the law's TTFT for arrivals 1..4, exactly (the fake reports what it slept)
    assert m4.prefill_s_per_request == pytest.approx(sum(GROWING.ttft_s(n) for n in range(1, 5)) / 4)
    # the record keeps it all and reads back
    record = server.record_from_sweep(result)
    assert RunRecord.from_json(json.loads(record.dumps())) == record


def test_saturation_stops_the_sweep_and_a_server_without_metrics_is_a_note(capsys):
    with load_server(SATURATING, metrics=False) as url:
        assert main(["bench-server", url, "--load", "1,2,4,8", "--repetitions", "1", "--max-tokens", str(TOKENS),
                     "--prompt-tokens", "16", "--slo-ttft-p99", "0.2", "--slo-itl-p99", "1000"]) == 0
    out = capsys.readouterr().out
    # 1 -> 2 streams: output tok/s flat (one slot), TTFT p99 from 100 ms to 350 ms (queued behind the other)
    assert "early stop: stopped after concurrency 2: saturated" in out and "concurrency 4, 8 not run" in out
    assert "TTFT p50/p90/p99 (ms)" in out and "output (tok/s)" in out and "req/s" in out
    # at 1 stream TTFT is 100 ms (meets 0.2 s); at 2 the queued request waits 350 ms
    assert "goodput: fake-load serves 1 stream at" in out
    assert "/metrics answered HTTP 404 (llama-server exports it only with --metrics)" in out


def test_no_level_meets_the_objective_says_why(capsys):
    with load_server(GROWING) as url:
        assert main(["bench-server", url, "--load", "1,2", "--repetitions", "1", "--max-tokens", "4",
                     "--prompt-tokens", "16", "--slo-itl-p99", "20", "--metrics-interval", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (good,) = data["goodput"]
    assert good["concurrency"] is None
    assert good["sentence"].startswith("no concurrency tested meets TTFT p99 ≤ 2 s, ITL p99 ≤ 20 ms, no errors: "
                                       "at concurrency 1, ITL p99 ")
    level = data["levels"][0]
    # GuideLLM's names in the JSON
    assert set(level["load"]) >= {"time_to_first_token_ms", "inter_token_latency_ms", "output_tokens_per_second",
                                  "requests_per_second", "successful", "errored"}
    assert set(level["load"]["time_to_first_token_ms"]) == {"mean", "p50", "p90", "p99", "n"}
    assert level["server_metrics"] is None and data["metrics_note"] is None and data["stopped_early"] is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--slo-ttft-p99", "0"], "need positive limits"),
    (["--stop-error-rate", "150"], "percentage from 0 to 100"),
    (["--stop-beyond-slo", "0.5"], "factor of 1 or more"),
    (["--load", "1,x"], "--load '1,x' is not a list of numbers"),
])
def test_bad_load_flags_are_one_sentence(argv, message, capsys):
    args = ["bench-server", "http://127.0.0.1:9", *argv]
    if "--load" not in argv:
        args.append("--load")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _level(c: int, tok_s: float, ttft_p99_ms: float, itl_p99_ms: float, errored: int = 0) -> ServerLevel:
    def dist(p99: float) -> Percentiles:
        return Percentiles(mean=p99 / 2, p50=p99 / 2, p90=p99 * 0.9, p99=p99, n=c)

    return ServerLevel(concurrency=c, aggregate_tok_s=Stat(tok_s, 0.0, 1), decode_tok_s_per_stream=None,
                       ttft_s=None, itl=None, tokens=0,
                       load=LevelLoad(time_to_first_token_ms=dist(ttft_p99_ms), inter_token_latency_ms=dist(itl_p99_ms),
                                      output_tokens_per_second=tok_s, requests_per_second=tok_s / 64,
                                      successful=c - errored, errored=errored,
                                      first_error="HTTP 503" if errored else None))


def test_stop_rules_by_hand():
    objective, rule = ServiceObjective(), StopRule()
    # throughput still growing 20 % while TTFT doubles: go on; growing 5 %: saturated
    assert stop_reason([_level(1, 100, 100, 10), _level(2, 120, 200, 10)], rule, objective) is None
    saturated = stop_reason([_level(1, 100, 100, 10), _level(2, 105, 200, 10)], rule, objective)
    assert saturated.startswith("stopped after concurrency 2: saturated, output 105.0 tok/s is +5 % against "
                                "100.0 tok/s at concurrency 1")
    # flat throughput with a flat TTFT is not saturation (a server with room that the client limits)
    assert stop_reason([_level(1, 100, 100, 10), _level(2, 101, 110, 10)], rule, objective) is None
    # one failure in 16 (6 %) is under the 10 % rule; two (12.5 %) stop
    assert stop_reason([_level(16, 100, 100, 10, errored=1)], rule, objective) is None
    assert "2 of 16 requests failed (12 % ≥ 10 %)" in stop_reason([_level(16, 100, 100, 10, errored=2)], rule,
                                                                   objective)
    far = StopRule(beyond_objective=3.0)
    assert stop_reason([_level(4, 100, 7000, 10)], far, objective).endswith("more than 3× the objective's 2 s")
    assert stop_reason([_level(4, 100, 5000, 10)], far, objective) is None
    # goodput: the highest passing level, even above a failing one
    levels = [_level(1, 50, 500, 50), _level(2, 80, 2500, 50), _level(4, 120, 1900, 90), _level(8, 150, 1900, 150)]
    assert goodput(levels, objective).concurrency == 4


def test_prometheus_text_of_both_engines():
    vllm = parse_prometheus('# HELP x\nvllm:num_requests_running{model_name="a b}",engine="0"} 3.0\n'
                            'vllm:num_requests_running{model_name="a",engine="1"} 2\n'
                            "vllm:kv_cache_usage_perc 0.25 1712345678\nnot a sample line\n")
    assert vllm["vllm:num_requests_running"] == [3.0, 2.0] and vllm["vllm:kv_cache_usage_perc"] == [0.25]
    # llama-server's handle_metrics (tools/server): no labels, integers and floats
    llama = parse_prometheus("# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n"
                             "llamacpp:requests_deferred 1\nllamacpp:prompt_seconds_total 2903.63\n")
    assert next(e for e in ENGINES if e.running in llama).engine == "llama-server"
    assert next(e for e in ENGINES if e.running in vllm).engine == "vLLM"


def test_a_sweep_stored_before_the_load_fields_still_loads():
    old_level = {"concurrency": 4, "aggregate_tok_s": {"mean": 30.0, "sd": 0.0, "n": 1},
                 "decode_tok_s_per_stream": None, "ttft_s": {"mean": 0.2, "sd": 0.0, "n": 4},
                 "itl": {"mean_ms": 20.0, "p50_ms": 19.0, "p99_ms": 30.0, "n": 12}, "tokens": 32, "depth": 0}
    old = {"model_id": "m", "host": "h:1", "max_tokens": 8, "repetitions": 1, "token_count": "chunks",
           "levels": [old_level], "error": None, "latency_ms": 1.0}
    sweep_result = from_jsonable(ServerSweep, old)
    level = sweep_result.levels[0]
    assert level.load is None and level.server_metrics is None
    assert level.itl == InterTokenLatency(20.0, 19.0, 30.0, 12) and level.itl.p90_ms is None
    assert sweep_result.load_plan is None and sweep_result.goodput == () and sweep_result.stopped_early is None
    # and a new one round-trips
    assert from_jsonable(ServerSweep, to_jsonable(sweep_result)) == sweep_result
