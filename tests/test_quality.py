"""Quality statistics: self-comparison, fp32 vs bf16, a hand-computed KLD, the tail bound, alignment, corpora."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

from qexplorer.core import quality
from qexplorer.core.domain.events import drive
from qexplorer.core.errors import UserError

VOCAB = 64


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def build(tmp_path: Path, logits_fn, top_k: int = VOCAB, n_tokens: int = 200, ctx: int = 32):
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, VOCAB, n_tokens)]
    chunks = quality.make_chunks(ids, ctx, bos_id=1)
    meta = quality.ReferenceMeta(format=quality.REFERENCE_FORMAT, model_path="tiny", reference_precision="fp32",
                                 corpus_name="random", corpus_sha256="x", n_tokens=len(chunks) * ctx, ctx=ctx,
                                 n_chunks=len(chunks), top_k=top_k, bos_id=1, vocab_size=VOCAB, probe_text="", probe_ids=ids[:10],
                                 reference_quantized=False)
    folder = tmp_path / f"ref-k{top_k}"
    for _ in quality.build_reference(folder, logits_fn, chunks, meta):
        pass
    return quality.load_reference(folder)


def stats_of(reference, logits_fn) -> quality.QualityStats:
    return drive(quality.candidate_pass(reference, logits_fn))


def test_reference_against_itself(tmp_path: Path, tiny_model):
    fn = quality.torch_logits_fn(tiny_model)
    reference = build(tmp_path, fn)
    stats = stats_of(reference, fn)
    assert stats.kld_mean == pytest.approx(0.0, abs=1e-6) and stats.kld_max < 1e-5
    assert stats.same_top1_pct == 100.0
    assert stats.ppl == pytest.approx(stats.ppl_ref, rel=1e-6)
    assert stats.n_positions == 6 * (32 - 1 - 16)  # 201 tokens → 6 chunks, second half scored


def test_bf16_against_fp32_is_small_and_positive(tmp_path: Path, tiny_model):
    import torch

    reference = build(tmp_path, quality.torch_logits_fn(tiny_model))
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    stats = stats_of(reference, quality.torch_logits_fn(bf16))
    assert 0 < stats.kld_mean < 0.01
    assert stats.same_top1_pct > 80
    assert stats.kld_p99 >= stats.kld_median >= 0


def test_hand_computed_kld_on_a_tiny_vocabulary():
    p = np.array([[0.7, 0.2, 0.1]])
    q = np.array([[0.5, 0.3, 0.2]])
    by_hand = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert quality.coarse_kld(np.log(p), np.log(q))[0] == pytest.approx(by_hand, rel=1e-12)
    # keeping only the top 2 of P lumps token 3 into a tail bucket: a lower bound (data processing)
    lumped = quality.coarse_kld(np.log(p[:, :2]), np.log(q[:, :2]))[0]
    assert lumped == pytest.approx(0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2))
    p4 = np.array([[0.6, 0.2, 0.1, 0.1]])
    q4 = np.array([[0.4, 0.3, 0.05, 0.25]])
    full = quality.coarse_kld(np.log(p4), np.log(q4))[0]
    top2 = quality.coarse_kld(np.log(p4[:, :2]), np.log(q4[:, :2]))[0]
    assert 0 < top2 < full


def test_top_k_is_a_lower_bound_of_the_full_vocabulary_kld(tmp_path: Path, tiny_model):
    import torch

    bf16 = quality.torch_logits_fn(copy.deepcopy(tiny_model).to(torch.bfloat16))
    fn = quality.torch_logits_fn(tiny_model)
    full = stats_of(build(tmp_path, fn, top_k=VOCAB), bf16).kld_mean
    top16 = stats_of(build(tmp_path, fn, top_k=16), bf16).kld_mean
    # A random model's flat distribution is the worst case for lumping; the gap on a real model is
    # measured by scripts/bench_quality.py (README "Quality").
    assert 0 < top16 <= full * (1 + 1e-9)


def test_alignment_check():
    meta = quality.ReferenceMeta(format=2, model_path="m", reference_precision="bf16", corpus_name="c",
                                 corpus_sha256="h", n_tokens=0, ctx=8, n_chunks=0, top_k=4, bos_id=None,
                                 vocab_size=10, probe_text="", probe_ids=[1, 2, 3], reference_quantized=False)
    quality.check_alignment(meta, [1, 2, 3], 10)
    with pytest.raises(UserError, match="first difference at token 1"):
        quality.check_alignment(meta, [1, 5, 3], 10)
    with pytest.raises(UserError, match="vocabulary of 12 tokens"):
        quality.check_alignment(meta, [1, 2, 3], 12)


def test_corpora(tmp_path: Path):
    corpus = quality.default_corpus(chars=12000)
    assert "lighthouse keeper" in corpus.text and "def " in corpus.text
    assert corpus.sha256 == quality.default_corpus(chars=12000).sha256  # deterministic
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(UserError, match="is empty"):
        quality.load_corpus(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        quality.load_corpus(latin)
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "first row"}\n{"text": "second row"}\n')
    (folder / "b.txt").write_text("plain text")
    assert quality.load_corpus(folder).text == "first row\n\nsecond row\n\nplain text"
    with pytest.raises(UserError, match="fewer than one chunk"):
        quality.make_chunks([1, 2, 3], 512, None)
