"""Model fixtures built from published configs (no weights, no download)."""

from __future__ import annotations

import json
from pathlib import Path

QWEN3_CODER_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "intermediate_size": 6144, "vocab_size": 151936, "tie_word_embeddings": False,
    "max_position_embeddings": 262144, "torch_dtype": "bfloat16",
}
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
}


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tiny_moe(folder: Path, arch: str = "qwen3_moe", dtype: str = "bfloat16") -> Path:
    """A random-weight MoE checkpoint small enough to quantize in a second on a CPU: 2 layers, hidden 64,
    4 experts (top 2), a 256-token word-level tokenizer. ``arch``: "qwen3_moe" (router only) or "qwen2_moe"
    (router and shared-expert gate). Weights are random: sizes and dtypes mean something, outputs do not."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    shape = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
             "num_experts_per_tok": 2, "decoder_sparse_step": 1, "max_position_embeddings": 256,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    if arch == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(head_dim=16, **shape))
    elif arch == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(shared_expert_intermediate_size=64, **shape))
    else:
        raise ValueError(arch)
    for param in model.parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.02)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 256)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder
