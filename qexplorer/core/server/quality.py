"""Quality through a running server: its echoed prompt log-probabilities on the reference's own chunks,
scored by the one top-k scorer (:class:`qexplorer.core.quality.TopkScorer`). Which position an entry describes
is read from the response itself (:func:`logprob_alignment`), never chosen by the KLD it would give."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from qexplorer.core.domain.events import JobEvent, Progress
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.domain.record import ServerQuality
from qexplorer.core.server.client import ServerError, ServerTarget, explain, open_client


def server_quality(target: ServerTarget, model_id: str, reference: Any, tokenizer: Any, top_k: int = 10,
                   max_chunks: int = 2) -> Generator[JobEvent, None, ServerQuality]:
    """Approximate KLD and top-1 agreement from the server's echoed prompt log-probabilities."""
    import httpx
    import numpy as np

    from qexplorer.core.quality import Chunking, TopkScorer

    meta, arrays = reference
    chunking = Chunking(meta.ctx, meta.n_chunks, meta.bos_id)
    first, per = chunking.first_scored, chunking.scored_per_chunk
    piece_to_id: dict[str, int] = {}
    for token_id in range(meta.vocab_size):
        piece_to_id.setdefault(tokenizer.decode([token_id]), token_id)
    scorer = TopkScorer()
    offset: int | None = None
    chunks = min(max_chunks, meta.n_chunks)
    with open_client(target) as client:
        for index in range(chunks):
            ids = [int(t) for t in arrays["chunks"][index]]
            body = {"model": model_id, "prompt": tokenizer.decode(ids), "max_tokens": 1, "echo": True,
                    "logprobs": top_k, "temperature": 0.0}
            try:
                response = client.post(target.url("/completions"), json=body)
                response.raise_for_status()
                logprobs = response.json()["choices"][0]["logprobs"]
                tokens, tops = logprobs["tokens"], logprobs["top_logprobs"]
            except httpx.HTTPError as exc:
                raise explain(target, exc) from None
            except (ValueError, KeyError, IndexError, TypeError):
                raise ServerError(f"{target.base_url} returned no prompt log-probabilities (echo + logprobs); "
                                  "quality cannot be measured through it.") from None
            expected = [tokenizer.decode([i]) for i in ids]
            if tokens[: len(expected)] != expected:
                raise ServerError("The server tokenizes the evaluation text differently from the local reference; "
                                  "quality through the server was not computed.")
            rows = slice(index * per, (index + 1) * per)
            ref_ids = np.asarray(arrays["topk_ids"][rows])
            ref_logp = np.asarray(arrays["topk_logp"][rows], dtype=np.float64)
            ref_top1 = np.asarray(arrays["top1"][rows])
            if offset is None:
                offset = logprob_alignment(tokens, tops, top_k)
            for j in range(per):
                position = first + j + offset
                top = (tops[position] if position < len(tops) else None) or {}
                ranked = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
                q = {piece_to_id[s]: lp for s, lp in ranked if s in piece_to_id}
                scorer.add(q, max(q, key=q.get) if q else None, ref_ids[j], ref_logp[j], ref_top1[j])
            yield Progress(PhaseKind.SERVER_QUALITY, index + 1, chunks, f"chunk {index + 1}/{chunks}")
    return scorer.result(top_k, f"KLD over the server's top-{top_k} (shared with the reference's top-{meta.top_k}) "
                                "plus one lumped bucket: a lower bound",
                         "OpenAI (entry i predicts token i)" if offset == 1 else
                         "shifted (entry i predicts token i + 1, as llama-cpp-python's server does)")


def logprob_alignment(tokens: list[str], tops: list[Any], top_k: int) -> int:
    """Which token an echoed ``top_logprobs`` entry predicts, read from the response: 1 when entry i is the
    distribution *for* token i (OpenAI's semantics, vLLM), 0 when it is the distribution *after* token i
    (llama-cpp-python's server).

    The test is the server's own self-consistency: under the right reading, the token that really comes next
    is among the k most likely entries at most positions of real text; under the wrong one, it is there about as
    often as any token is in an unrelated distribution. Servers also add the echoed token's own entry to
    each dict, so only the ``top_k`` highest entries count."""

    def hit(entry: Any, token: str) -> bool:
        ranked = sorted((entry or {}).items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        return any(piece == token for piece, _ in ranked)

    n = min(len(tokens), len(tops)) - 1
    if n < 8:
        raise ServerError("The server returned too few prompt log-probabilities to tell how they are aligned.")
    same = sum(hit(tops[i], tokens[i]) for i in range(1, n + 1)) / n
    after = sum(hit(tops[i], tokens[i + 1]) for i in range(0, n)) / n
    if max(same, after) < 0.2 or abs(same - after) < 0.1:
        raise ServerError(f"The server's echoed log-probabilities fit neither alignment (the next token is in its "
                          f"top-{top_k} at {100 * same:.0f} % / {100 * after:.0f} % of positions); quality "
                          "through it was not computed.")
    return 1 if same > after else 0
