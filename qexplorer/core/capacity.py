"""Capacity: how many sequences of the chosen context run at once, per precision, in the live headroom.

The seed's case for FP8 on a GB10: the weights decide how much KV cache fits beside them, and the KV cache
decides how many sequences run at once at a given context. For one precision:

    kv_budget_bytes = headroom − weight_bytes − overhead_bytes
                      (the plan's own figures: headroom = MemAvailable − reserve on unified memory and the CPU,
                      free VRAM on a card; overhead = the engine's runtime and its activations - for vLLM on a
                      GPU its measured overhead: CUDA context, activations, CUDA-graph pool, API server)
    sequences       = how many ``context``-token sequences the engine fits in that budget, with its own rounding:

**vLLM** (0.32; paths relative to the ``vllm`` package). Paged KV cache in blocks of ``block`` tokens:
16 on CUDA (``config/cache.py`` ``CacheConfig.DEFAULT_BLOCK_SIZE``, l. 72 - an attention backend may prefer a
larger page, ``platforms/interface.py`` l. 772, logged "Setting kv cache block size to ..."), 128 on the CPU
(``platforms/cpu.py`` ``check_and_update_config``, l. 293). For a model whose layers all use full attention
one block of every layer is ``block × kv_bytes_per_token`` (``v1/core/kv_cache_utils.py``
``_get_kv_cache_bytes_per_block``: the sum of the layers' ``page_size_bytes``), and

    num_blocks          = kv_budget_bytes // bytes_per_block     (get_kv_cache_config_from_groups, l. 1627)
    blocks_per_sequence = ceil(context / block)                  (FullAttentionSpec.max_memory_usage_bytes ÷
                                                                  page_size_bytes, get_max_concurrency_for_kv_cache_config)
    sequences           = (num_blocks − 1) // blocks_per_sequence

One block is the null block the ``BlockPool`` holds back for good (``v1/core/block_pool.py`` l. 187; the
capacity check "plans against usable blocks", ``get_kv_cache_configs``). vLLM's own log line "Maximum
concurrency for X tokens per request: Y x" (``update_kv_cache_capacity``) prints
``num_blocks / blocks_per_sequence`` unrounded, null block included - at most a fraction above this figure.
KV dtypes: the model's (``--kv-cache-dtype auto``: bf16 / f16 / f32) or ``fp8`` (``config/cache.py``
``CacheDType``); vLLM has no q8_0 / q4_0 cache.

**llama.cpp** (``llama-server``). ``--parallel N`` makes N slots; with ``-c`` the KV cache's total, each slot
gets ``llama_n_ctx_seq`` tokens (``tools/server/server-context.cpp``), which ``llama_context``'s constructor
sets to ``pad(n_ctx / n_seq_max, 256)`` when the KV cache is not unified (``src/llama-context.cpp``; an explicit
``--parallel`` leaves ``kv_unified`` off - only the automatic ``-np -1`` turns it on, with 4 slots:
``tools/server/server.cpp``). So N sequences of ``context`` tokens take ``-c N × context`` and

    kv_bytes_per_sequence = kv_bytes_per_token × pad(context, 256)
    sequences             = min(kv_budget_bytes // kv_bytes_per_sequence, 256)

256 is ``LLAMA_MAX_SEQ`` (``src/llama-cparams.h``: "n_seq_max must be <= 256"). Cache types here: f32, f16,
bf16, q8_0 (34 bytes per 32 values), q4_0 (18 per 32); llama.cpp has no fp8 cache.

**transformers** (the fallback that measures a precision vLLM cannot run here): a contiguous cache of
``context`` tokens per sequence, no rounding.

Models with sliding-window layers are counted as full attention (every layer holds the whole context), as
the plan's ``kv_bytes_per_token`` does: an upper bound on their KV cache, so a lower bound on the sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qexplorer.core.kinds import Engine
from qexplorer.core.units import format_bytes

VLLM_BLOCK_TOKENS = {"cuda": 16, "cpu": 128}  # config/cache.py DEFAULT_BLOCK_SIZE; platforms/cpu.py
VLLM_NULL_BLOCKS = 1  # v1/core/block_pool.py: BlockPool.null_block
VLLM_KV_DTYPES = ("f32", "f16", "bf16", "fp8")  # --kv-cache-dtype auto (the model's dtype) or fp8
LLAMA_CPP_PAD_TOKENS = 256  # src/llama-context.cpp: n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256)
LLAMA_CPP_MAX_SEQ = 256  # src/llama-cparams.h: LLAMA_MAX_SEQ
LLAMA_CPP_KV_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # llama-server --cache-type-k / -v


@dataclass(frozen=True)
class Capacity:
    """How many ``context``-token sequences one precision's engine holds at once in the live headroom."""

    sequences: int | None  # None where the headroom is unknown or the engine has no such KV dtype
    context: int  # tokens per sequence
    kv_dtype: str
    kv_bytes_per_sequence: int  # with the engine's rounding (whole vLLM blocks, llama.cpp's 256-token padding)
    kv_budget_bytes: int | None  # headroom − weights − overhead (negative: they do not fit at all)
    rule: str  # the engine's rule, in words, with its figures
    limit: str | None = None  # why there are no sequences (or no figure), in one sentence


def sequences_text(sequences: int | None) -> str:
    """A capacity as a table cell: "12 seq", "0 seq", or "—" where there is no figure."""
    return "—" if sequences is None else f"{sequences:,} seq"


def _pad(tokens: int, multiple: int) -> int:
    return math.ceil(tokens / multiple) * multiple


def plan_capacity(engine: Engine, device_kind: str, kv_dtype: str, kv_bytes_per_token: int, context: int,
             headroom_bytes: int | None, weight_bytes: int, overhead_bytes: int) -> Capacity:
    """The sequences at ``context`` tokens that fit beside ``weight_bytes`` and ``overhead_bytes`` in
    ``headroom_bytes``, counted the way ``engine`` allocates its KV cache on ``device_kind`` ("cuda"/"cpu")."""
    if engine == Engine.VLLM:
        block = VLLM_BLOCK_TOKENS[device_kind]
        blocks_per_sequence = math.ceil(context / block)
        bytes_per_block = block * kv_bytes_per_token
        per_sequence = blocks_per_sequence * bytes_per_block
        rule = (f"vLLM: {block}-token blocks ({format_bytes(bytes_per_block)}, all layers), {blocks_per_sequence} per "
                f"sequence, 1 null block")
        supported = kv_dtype in VLLM_KV_DTYPES
    elif engine == Engine.LLAMA_CPP:
        cells = _pad(context, LLAMA_CPP_PAD_TOKENS)
        per_sequence = cells * kv_bytes_per_token
        rule = (f"llama.cpp: --parallel N -c N×{context:,}, {cells:,} cells per slot (padded to "
                f"{LLAMA_CPP_PAD_TOKENS}), at most {LLAMA_CPP_MAX_SEQ} slots")
        supported = kv_dtype in LLAMA_CPP_KV_DTYPES
    else:
        per_sequence = context * kv_bytes_per_token
        rule = f"{engine}: {context:,} contiguous tokens per sequence"
        supported = True
    budget = None if headroom_bytes is None else headroom_bytes - weight_bytes - overhead_bytes
    if not supported:
        return Capacity(None, context, kv_dtype, per_sequence, budget, rule,
                        f"{engine} has no {kv_dtype} KV cache; choose another KV dtype (k on the plan screen)")
    if budget is None:
        return Capacity(None, context, kv_dtype, per_sequence, None, rule,
                        "no live headroom reading: capacity needs one")
    if engine == Engine.VLLM:
        usable_blocks = budget // bytes_per_block - VLLM_NULL_BLOCKS if budget > 0 else 0
        sequences = max(0, usable_blocks) // blocks_per_sequence
        rule += f": {max(0, usable_blocks):,} usable"
    else:
        sequences = max(0, budget) // per_sequence
        if engine == Engine.LLAMA_CPP and sequences > LLAMA_CPP_MAX_SEQ:
            rule += f" (memory for {sequences:,})"
            sequences = LLAMA_CPP_MAX_SEQ
    limit = None
    if sequences == 0:
        left = ("leave nothing" if budget <= 0 else f"leave {format_bytes(budget)}")
        limit = (f"weights ({format_bytes(weight_bytes)}) + overhead ({format_bytes(overhead_bytes)}) {left} of "
                 f"the {format_bytes(headroom_bytes)} headroom: no room for one {context:,}-token sequence "
                 f"({format_bytes(per_sequence)} of {kv_dtype} KV cache)")
    return Capacity(int(sequences), context, kv_dtype, per_sequence, budget, rule, limit)
