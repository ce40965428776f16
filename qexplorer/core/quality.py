"""Quality against the full-precision model: KL divergence, top-1 agreement, perplexity.

Method (llama-perplexity ``--kl-divergence``, FACTS §4): the text is tokenized
once; BOS is prepended and the token list cut into chunks of ``ctx`` tokens
whose first token is BOS; in each chunk the second half is scored (positions
``ctx/2 … ctx-2`` predicting the next token), so every scored token has at
least ``ctx/2`` tokens of context.

**Reference pass** (once per model + corpus + reference precision + ctx): per
scored position the reference's top-``k`` token ids and log-probabilities
(float32), the correct token's log-probability and the tokens themselves, in
``.npy`` files filled chunk by chunk and memory-mapped when read. The tail
beyond the top ``k`` is kept as one lumped bucket, so the stored KLD is the KL
divergence of the two distributions coarsened to ``k + 1`` outcomes: a lower
bound on the full-vocabulary KLD. ``tests/test_quality.py`` measures the gap.

**Candidate pass**: the same token ids go through the candidate (torch or
llama.cpp); per position it yields KLD, both NLLs, Δp of the correct token and
argmax agreement. Memory is O(ctx × vocab) for one chunk plus O(positions) for
the per-position figures, independent of the corpus length's effect on logits.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
import shutil
import sysconfig
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qexplorer.core.domain.events import JobEvent, Progress
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import QualityStats, ServerQuality
from qexplorer.core.errors import UserError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
PROSE_FILE = DATA_DIR / "prose.txt"
# Standard-library modules read in this order to make up the code part of the default corpus.
STDLIB_FILES = ("textwrap.py", "heapq.py", "bisect.py", "colorsys.py", "fnmatch.py", "shlex.py",
                "string.py", "statistics.py", "calendar.py", "difflib.py", "fractions.py", "argparse.py",
                "csv.py", "dataclasses.py", "ipaddress.py", "pprint.py", "random.py", "tarfile.py")
DEFAULT_TOKENS = 4096
DEFAULT_CTX = 512
DEFAULT_TOP_K = 256
REFERENCE_FORMAT = 3



def kld_name(top_k: int = DEFAULT_TOP_K) -> str:
    """What the stored KLD is: over the reference's top-k outcomes plus one lumped tail, a lower bound on the
    full-vocabulary KLD (the module's note)."""
    return f"KLD (top-{top_k}, lower bound)"


LogitsFn = Callable[[list[int]], Any]  # chunk token ids -> float32 array [len(ids), vocab]


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def default_corpus(chars: int = 24_000) -> Corpus:
    """Original English prose shipped with qexplorer, then Python standard-library source.

    The code part depends on the Python version (recorded through the corpus hash).
    """
    parts = [PROSE_FILE.read_text(encoding="utf-8")]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        if sum(len(p) for p in parts) >= chars:
            break
        path = stdlib / name
        if path.exists():
            parts.append(f"# {name}\n" + path.read_text(encoding="utf-8"))
    return Corpus("default (prose + Python stdlib)", "\n\n".join(parts)[:chars])


def corpus_for(path: str | None, tokens: int) -> Corpus:
    """The evaluation text of a job: the user's file or folder, or the default corpus cut to about ``tokens``.
    Read once per version of its files (the plan screen asks every second: it must not read and hash the text
    on the event loop each time)."""
    if path:
        files = _corpus_files(Path(path))
        stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        return _corpus_cached(path, stamps)
    # ~6 characters per token leaves room for prose and code alike; the tokens are cut to size after
    return _default_cached(tokens * 6)


@functools.lru_cache(maxsize=8)
def _corpus_cached(path: str, _stamps: tuple[tuple[str, int, int], ...]) -> Corpus:
    return load_corpus(Path(path))


@functools.lru_cache(maxsize=8)
def _default_cached(chars: int) -> Corpus:
    return default_corpus(chars=chars)


def reference_cached(data_dir: Path, model_key: str, corpus_path: str | None, precision: str, ctx: int,
                     tokens: int, top_k: int) -> bool:
    """Whether this model + corpus + settings already has its reference (then no job builds it again)."""
    try:
        corpus = corpus_for(corpus_path, tokens)
    except UserError:  # a bad corpus fails the job with its own message; a plan assumes a build
        return False
    return (reference_dir(data_dir, model_key, corpus, precision, ctx, tokens, top_k) / "meta.json").is_file()


def _corpus_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".md", ".jsonl") and p.is_file())
        if not files:
            raise UserError(f"{path} holds no .txt, .md or .jsonl files to evaluate on.")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"The evaluation text {path} does not exist.")


def load_corpus(path: Path) -> Corpus:
    """A UTF-8 text file, or a folder of .txt / .md / .jsonl files read in name order."""
    files = _corpus_files(path)
    texts = []
    for file in files:
        try:
            raw = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"The evaluation text {file} is not UTF-8 text; convert it or pick another file.") from None
        except PermissionError:
            raise UserError(f"The evaluation text {file} cannot be read: permission denied.") from None
        if file.suffix == ".jsonl":
            raw = "\n\n".join(_jsonl_texts(raw, file))
        texts.append(raw)
    text = "\n\n".join(texts)
    if not text.strip():
        raise UserError(f"The evaluation text {path} is empty.")
    return Corpus(path.name, text)


def _jsonl_texts(raw: str, file: Path) -> Iterator[str]:
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{file} line {number} is not JSON; a .jsonl dataset needs one object per line.") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            yield row["text"]


# ----------------------------------------------------------------- chunking
@dataclass(frozen=True)
class Chunking:
    ctx: int
    n_chunks: int
    bos_id: int | None

    @property
    def first_scored(self) -> int:
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.ctx - 1 - self.first_scored

    @property
    def n_scored(self) -> int:
        return self.n_chunks * self.scored_per_chunk


def make_chunks(ids: list[int], ctx: int, bos_id: int | None) -> list[list[int]]:
    """llama-perplexity's chunking: BOS, then ``ctx`` tokens per chunk with the first replaced by BOS."""
    tokens = ([bos_id] if bos_id is not None else []) + list(ids)
    n_chunks = len(tokens) // ctx
    if n_chunks < 1:
        raise UserError(f"The evaluation text has {len(tokens)} tokens, fewer than one chunk of {ctx}; "
                        "use a longer text or a shorter context.")
    chunks = []
    for index in range(n_chunks):
        chunk = tokens[index * ctx:(index + 1) * ctx]
        if bos_id is not None:
            chunk[0] = bos_id
        chunks.append(chunk)
    return chunks


def log_softmax(logits: Any) -> Any:
    import numpy as np

    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------- reference
@dataclass(frozen=True)
class ReferenceMeta:
    format: int
    model_path: str
    reference_precision: str
    corpus_name: str
    corpus_sha256: str
    n_tokens: int
    ctx: int
    n_chunks: int
    top_k: int
    bos_id: int | None
    vocab_size: int
    probe_text: str  # what probe_ids tokenize: candidates tokenize the same text
    probe_ids: list[int]
    reference_quantized: bool
    device: str = "cpu"  # where the reference ran ("cuda" on a GPU job: the candidate's own device)


def reference_dir(data_dir: Path, model_key: str, corpus: Corpus, precision: str, ctx: int, tokens: int,
                  top_k: int) -> Path:
    tag = f"{corpus.sha256[:12]}-{precision}-ctx{ctx}-t{tokens}-k{top_k}"
    return data_dir / "references" / model_key / tag


def load_reference(folder: Path) -> tuple[ReferenceMeta, dict[str, Any]] | None:
    import numpy as np

    meta_file = folder / "meta.json"
    if not meta_file.exists():
        return None
    try:
        meta = ReferenceMeta(**json.loads(meta_file.read_text(encoding="utf-8")))
    except (TypeError, ValueError):
        return None
    if meta.format != REFERENCE_FORMAT:
        return None
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
              for name in ("chunks", "topk_ids", "topk_logp", "target_logp", "top1")}
    return meta, arrays


def build_reference(folder: Path, logits_fn: LogitsFn, chunks: list[list[int]], meta: ReferenceMeta,
                    ) -> Generator[JobEvent, None, None]:
    """Run the reference over every chunk; store top-k log-probs chunk by chunk (memory-mapped)."""
    import numpy as np

    chunking = Chunking(meta.ctx, len(chunks), meta.bos_id)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, mode=0o700)
    k = meta.top_k
    n = chunking.n_scored
    fmt = np.lib.format
    chunk_arr = fmt.open_memmap(partial / "chunks.npy", mode="w+", dtype=np.int32, shape=(len(chunks), meta.ctx))
    topk_ids = fmt.open_memmap(partial / "topk_ids.npy", mode="w+", dtype=np.int32, shape=(n, k))
    topk_logp = fmt.open_memmap(partial / "topk_logp.npy", mode="w+", dtype=np.float32, shape=(n, k))
    target_logp = fmt.open_memmap(partial / "target_logp.npy", mode="w+", dtype=np.float32, shape=(n,))
    # argmax kept apart: BF16 logits tie often, and top-1 agreement must break ties the same way both sides
    top1 = fmt.open_memmap(partial / "top1.npy", mode="w+", dtype=np.int32, shape=(n,))
    first, per = chunking.first_scored, chunking.scored_per_chunk
    for index, chunk in enumerate(chunks):
        chunk_arr[index] = chunk
        logp = log_softmax(logits_fn(chunk))[first:first + per]
        if logp.shape[-1] != meta.vocab_size:
            raise UserError(f"The reference returned {logp.shape[-1]} logits per position, not {meta.vocab_size}.")
        targets = np.asarray(chunk[first + 1:first + 1 + per])
        top = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        order = np.argsort(-np.take_along_axis(logp, top, axis=-1), axis=-1)
        top = np.take_along_axis(top, order, axis=-1)
        rows = slice(index * per, (index + 1) * per)
        topk_ids[rows] = top
        topk_logp[rows] = np.take_along_axis(logp, top, axis=-1)
        target_logp[rows] = logp[np.arange(per), targets]
        top1[rows] = logp.argmax(axis=-1)
        yield Progress(PhaseKind.REFERENCE, index + 1, len(chunks), f"reference chunk {index + 1}/{len(chunks)}")
    for array in (chunk_arr, topk_ids, topk_logp, target_logp, top1):
        array.flush()
    del chunk_arr, topk_ids, topk_logp, target_logp, top1
    (partial / "meta.json").write_text(json.dumps(asdict(meta)), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def check_alignment(meta: ReferenceMeta, candidate_probe_ids: list[int], candidate_vocab: int) -> None:
    """Reference and candidate must see the same token ids, or KLD compares different things."""
    if candidate_vocab != meta.vocab_size:
        raise UserError(f"The candidate has a vocabulary of {candidate_vocab} tokens and the reference "
                        f"{meta.vocab_size}; their tokenizers differ, so KLD cannot be computed.")
    if list(candidate_probe_ids) != list(meta.probe_ids):
        first = next((i for i, (a, b) in enumerate(zip(candidate_probe_ids, meta.probe_ids, strict=False)) if a != b),
                     min(len(candidate_probe_ids), len(meta.probe_ids)))
        raise UserError(f"The candidate's tokenizer splits the evaluation text differently from the reference's "
                        f"(first difference at token {first}); KLD would compare different tokens, so it was not "
                        "computed.")


# ----------------------------------------------------------------- candidate
def candidate_pass(reference: tuple[ReferenceMeta, dict[str, Any]], logits_fn: LogitsFn,
                   ) -> Generator[JobEvent, None, QualityStats]:
    """Per-position KLD / NLL / Δp / agreement for the candidate; yields progress, returns the statistics."""
    import numpy as np

    meta, arrays = reference
    chunking = Chunking(meta.ctx, meta.n_chunks, meta.bos_id)
    first, per = chunking.first_scored, chunking.scored_per_chunk
    n = chunking.n_scored
    kld = np.empty(n, dtype=np.float64)
    nll_q = np.empty(n, dtype=np.float64)
    delta_p = np.empty(n, dtype=np.float64)
    same_top1 = np.empty(n, dtype=bool)
    for index in range(meta.n_chunks):
        chunk = [int(t) for t in arrays["chunks"][index]]
        logq = log_softmax(logits_fn(chunk))[first:first + per]
        rows = slice(index * per, (index + 1) * per)
        top_ids = np.asarray(arrays["topk_ids"][rows])
        top_logp = np.asarray(arrays["topk_logp"][rows], dtype=np.float64)
        target_logp = np.asarray(arrays["target_logp"][rows], dtype=np.float64)
        targets = np.asarray(chunk[first + 1:first + 1 + per])
        kld[rows] = coarse_kld(top_logp, np.take_along_axis(logq, top_ids, axis=-1).astype(np.float64))
        q_target = logq[np.arange(per), targets].astype(np.float64)
        nll_q[rows] = -q_target
        delta_p[rows] = np.exp(q_target) - np.exp(target_logp)
        same_top1[rows] = logq.argmax(axis=-1) == np.asarray(arrays["top1"][rows])
        yield Progress(PhaseKind.QUALITY, index + 1, meta.n_chunks, f"candidate chunk {index + 1}/{meta.n_chunks}")
    nll_ref = -np.asarray(arrays["target_logp"], dtype=np.float64)
    return QualityStats(**summarize(kld, nll_q, nll_ref, delta_p, same_top1))


def reference_self_stats(reference: tuple[ReferenceMeta, dict[str, Any]]) -> QualityStats:
    """The reference precision's own row, exactly, from the reference pass: the same weights in the same dtype
    on the same device compute the same logits, so a candidate pass would only repeat the reference's work
    (KLD 0, top-1 100 %, PPL = the reference's)."""
    import numpy as np

    _meta, arrays = reference
    nll_ref = -np.asarray(arrays["target_logp"], dtype=np.float64)
    n = len(nll_ref)
    return QualityStats(**summarize(np.zeros(n), nll_ref, nll_ref, np.zeros(n), np.ones(n, dtype=bool)))


def coarse_kld(top_logp: Any, top_logq: Any) -> Any:
    """KL(P‖Q) over the top-k outcomes of P plus one lumped tail bucket (a lower bound on the full KLD)."""
    import numpy as np

    p = np.exp(top_logp)
    q = np.exp(top_logq)
    head = (p * (top_logp - top_logq)).sum(axis=-1)
    p_tail = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - q.sum(axis=-1), 1e-30, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 1e-12, p_tail * (np.log(np.maximum(p_tail, 1e-30)) - np.log(q_tail)), 0.0)
    return np.maximum(head + tail, 0.0)


class TopkScorer:
    """The one scorer of a server's top-k log-probabilities against the reference's top-k, position by position
    (vLLM's prompt log-probs and bench-server's echoed ones): KL(reference ‖ server) over the outcomes both lists
    share plus one lumped bucket (:func:`coarse_kld`, a lower bound), and top-1 agreement.

    A position where the server returned nothing, or where the two lists share no outcome, is where the two
    models disagree most: skipping it would bias both figures toward agreement. It counts as a top-1 miss, its
    KLD cannot be bounded from the lists (it is left out of the mean), and how many there were is reported."""

    def __init__(self) -> None:
        self.klds: list[float] = []
        self.agree: list[bool] = []
        self.disjoint = 0

    def add(self, server: dict[int, float], server_top1: int | None, ref_ids: Any, ref_logp: Any,
            ref_top1: int) -> None:
        import numpy as np

        p = dict(zip(ref_ids.tolist(), ref_logp.tolist(), strict=True))
        shared = [t for t in server if t in p]
        self.agree.append(server_top1 is not None and int(server_top1) == int(ref_top1))
        if not shared:
            self.disjoint += 1
            return
        self.klds.append(float(coarse_kld(np.array([[p[t] for t in shared]]),
                                          np.array([[server[t] for t in shared]]))[0]))

    def result(self, top_k: int, approximation: str, alignment: str) -> ServerQuality:
        n = len(self.agree)
        share = sum(self.agree) / n if n else 0.0
        return ServerQuality(
            kld_mean=sum(self.klds) / len(self.klds) if self.klds else None, n_positions=n, top_k=top_k,
            same_top1_pct=100.0 * share if n else None,
            same_top1_se_pct=100.0 * math.sqrt(share * (1 - share) / n) if n else None,
            approximation=approximation, logprob_alignment=alignment, n_disjoint=self.disjoint)


def summarize(kld: Any, nll_q: Any, nll_ref: Any, delta_p: Any, same_top1: Any) -> dict[str, Any]:
    """llama-perplexity's report: PPLs, ln ratio, KLD distribution, same top-1 with its uncertainty, Δp."""
    import numpy as np

    n = len(kld)
    mean_nll_q, mean_nll_ref = float(np.mean(nll_q)), float(np.mean(nll_ref))
    log_ratio = nll_q - nll_ref
    agree = float(np.mean(same_top1))
    quantiles = np.quantile(kld, [0.5, 0.9, 0.95, 0.99, 0.999]) if n else [math.nan] * 5
    return {
        "n_positions": int(n),
        "ppl": math.exp(mean_nll_q), "ppl_ref": math.exp(mean_nll_ref),
        "ln_ppl_ratio": float(np.mean(log_ratio)),
        "ln_ppl_ratio_se": float(np.std(log_ratio, ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "kld_mean": float(np.mean(kld)), "kld_sd": float(np.std(kld, ddof=1)) if n > 1 else 0.0,
        "kld_se": float(np.std(kld, ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "kld_median": float(quantiles[0]), "kld_p90": float(quantiles[1]), "kld_p95": float(quantiles[2]),
        "kld_p99": float(quantiles[3]), "kld_p999": float(quantiles[4]), "kld_max": float(np.max(kld)),
        "same_top1_pct": 100.0 * agree,
        "same_top1_se_pct": 100.0 * math.sqrt(agree * (1 - agree) / n) if n else 0.0,
        "delta_p_mean_pct": 100.0 * float(np.mean(delta_p)),
        "delta_p_rms_pct": 100.0 * float(np.sqrt(np.mean(delta_p ** 2))),
        "ppl_se": math.exp(mean_nll_q) * float(np.std(nll_q, ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "kld_positions": encode_positions(kld),
    }


def encode_positions(values: Any) -> str:
    """Per-position figures as float32 little-endian bytes in base64 (QualityStats.kld_positions)."""
    import numpy as np

    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


# ----------------------------------------------------------------- backends
def torch_logits_fn(model: Any) -> LogitsFn:
    import torch

    device = next(model.parameters()).device

    def logits(ids: list[int]) -> Any:
        with torch.inference_mode():
            out = model(torch.tensor([ids], device=device), use_cache=False)
            return out.logits[0].float().cpu().numpy()

    return logits


def llamacpp_logits_fn(llm: Any) -> LogitsFn:
    import numpy as np

    def logits(ids: list[int]) -> Any:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)

    return logits


def probe_text(corpus: Corpus) -> str:
    return corpus.text[:2000]
