"""Generation benchmarks with llama-bench's method (FACTS §3).

A warm-up (llama-bench's: the prompt once, then one generated token), then
``repetitions`` timed runs of prompt processing (pp: one
batch of ``prompt_tokens`` tokens) and token generation (tg: ``gen_tokens``
single-token decode steps); tokenization and sampling are outside the timing.
Every figure is reported as mean ± standard deviation over the repetitions.

Depth (llama-bench's ``-d``): with ``depths`` (0, 4096, …) each pp and tg is
measured again after a context of that many tokens has been prefilled (outside
the timing), so the figures say what a long session costs, not an empty one.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass


def default_threads() -> int:
    """One thread per physical core this process may run on, within its CPU quota - llama-bench's default
    (``cpu_get_num_math``: physical cores), and the same for every engine. ``os.cpu_count()`` counts logical
    CPUs, and inside a container the host's: two threads per core on an SMT host, and heavy oversubscription in
    a cgroup. Physical cores are counted from sysfs topology (package, core) of the CPUs in the affinity mask."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (some VMs): each CPU counts as a core
    count = len(cores) or 1
    quota = _cpu_quota()
    return max(1, min(count, int(quota + 0.5))) if quota else count


def _cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """The cgroup v2 CPU quota in CPUs ("200000 100000" → 2.0); None where there is none."""
    try:
        with open(path) as handle:
            quota, period = handle.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 512  # pp512
    gen_tokens: int = 128  # tg128
    repetitions: int = 5  # the most timed repetitions (llama-bench's fixed count)
    threads: int = 0  # 0: the library's default
    warmup: bool = True
    depths: tuple[int, ...] = (0,)  # prefilled context before each pp / tg (llama-bench -d)
    min_repetitions: int = 3  # the fewest before the stopping rule may end the series
    sem_target_pct: float = 2.0  # stop once pp's and tg's standard error of the mean is within this (% of the mean)

    @property
    def thread_count(self) -> int:
        """The threads asked for, or :func:`default_threads`: what every engine is given and what the result
        records."""
        return self.threads or default_threads()

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    @property
    def context_tokens(self) -> int:
        """The context the deepest test needs: depth + prompt + generated tokens."""
        return self.max_depth + self.prompt_tokens + self.gen_tokens

    def describe(self) -> str:
        """"pp512 / tg128 × 5" and, past depth 0, "at depth 0, 2048": the benchmark phase's line."""
        depths = "" if self.depths == (0,) else " at depth " + ", ".join(str(d) for d in self.depths)
        return f"pp{self.prompt_tokens} / tg{self.gen_tokens} × {self.repetitions}{depths}"

    def settled(self, *series_s: list[float]) -> bool:
        """The stopping rule of the adaptive repetitions, after each one: stop at ``repetitions``; before
        ``min_repetitions`` go on; in between stop once every series' standard error of the mean is within
        ``sem_target_pct`` of its mean. Why 2 %: the 95 % interval is then about ±4 %, inside the 5-10 % gaps
        between neighbouring K-quants that the comparison has to resolve; a quiet machine gets there in three
        repetitions (CV ≤ 3.4 %), a noisy one runs the full count and is flagged by the noise probe."""
        if max(len(s) for s in series_s) >= self.repetitions:
            return True
        n = min(len(s) for s in series_s)
        if n < min(self.min_repetitions, self.repetitions):
            return False
        return all(sem_pct(s) <= self.sem_target_pct for s in series_s)

    @staticmethod
    def quick() -> BenchConfig:
        """For demos and tests: pp64, tg16, two repetitions."""
        return BenchConfig(prompt_tokens=64, gen_tokens=16, repetitions=2, min_repetitions=2)


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Stat:
        """Mean ± sd of the values; no values (an engine that returned no decode samples) is ``n == 0``, a
        missing figure that exports as null, never a zero."""
        if not values:
            return Stat(0.0, 0.0, 0)
        return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    @property
    def known_mean(self) -> float | None:
        return self.mean if self.n > 0 else None

    @property
    def known_sd(self) -> float | None:
        return self.sd if self.n > 0 else None

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}

    @property
    def cv_pct(self) -> float | None:
        """Coefficient of variation (sd / mean) in percent; None for a single value or a zero mean."""
        return 100.0 * self.sd / self.mean if self.n > 1 and self.mean > 0 else None


def depth_choices(context: int, config: BenchConfig) -> tuple[tuple[int, ...], ...]:
    """The depth sets the plan screen cycles through for a context length: none, half of it, and a quarter /
    half / all of what is left after pp and tg (each test must fit the context it was planned for)."""
    room = max(0, context - config.prompt_tokens - config.gen_tokens)
    choices = [(0,), (0, room // 2), (0, room // 4, room // 2, room)]
    return tuple(dict.fromkeys(tuple(dict.fromkeys(c)) for c in choices if room or c == (0,)))


def parse_depths(text: str) -> tuple[int, ...]:
    """``--depth 0,2048,4096`` → (0, 2048, 4096); one sentence on anything else."""
    from qexplorer.core.errors import UserError

    try:
        depths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--depth {text!r} is not a list of token counts such as 0,2048,8192.") from None
    if not depths or min(depths) < 0:
        raise UserError("--depth needs token counts of 0 or more, such as 0,2048.")
    return tuple(dict.fromkeys(depths))


def sem_pct(values: list[float]) -> float:
    """Standard error of the mean as a percentage of the mean (infinite for fewer than two values)."""
    if len(values) < 2 or statistics.fmean(values) <= 0:
        return float("inf")
    return 100.0 * statistics.stdev(values) / len(values) ** 0.5 / statistics.fmean(values)


def rates(tokens: int, seconds: list[float]) -> Stat:
    """Tokens per second for each repetition, then mean ± sd (as llama-bench does)."""
    return Stat.of([tokens / s for s in seconds if s > 0])


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # the libraries' intra-op threads
THREAD_ENV_KEY = "QEXPLORER_THREAD_ENV"  # the user's own THREAD_VARS, kept by a worker that changed them


def known(value: float | None) -> float | None:
    """A figure, or None where it was never measured (a legacy row's missing field is NaN, never 0)."""
    return None if value is None or math.isnan(value) else value


def roofline_pct(decode_tok_s: float, bytes_per_token: float, bandwidth_bytes_s: float | None) -> float | None:
    """Decode speed as a percentage of the memory-bandwidth bound."""
    if not bandwidth_bytes_s or bytes_per_token <= 0:
        return None
    return 100.0 * decode_tok_s * bytes_per_token / bandwidth_bytes_s
