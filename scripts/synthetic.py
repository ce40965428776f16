"""Random-weight models of other shapes, built from a config (no download), for the benchmark scripts.

Each is a BF16 Hugging Face folder with the bundled model's tokenizer (its vocabulary, 49152 tokens), so every
precision, engine and quality pass runs on it as on a real checkpoint. Weights are random: speed and memory
are meaningful, quality figures are not.

    dense-185m   Llama, 12 layers, hidden 1024, GQA 16/4 heads              185 M parameters
    llama-0.5b   Llama, 24 layers, hidden 1024, GQA 16/4 heads, MLP 4096     0.41 B parameters
    moe-small    Qwen3-MoE, 8 layers, hidden 512, 16 experts (top-2)        106 M parameters, 40 M active
    llama-1b     Llama, 16 layers, hidden 2048, GQA 32/8 heads              1.2 B parameters (GPU check)
    moe-1b       Qwen3-MoE, 12 layers, hidden 1024, 32 experts (top-4)      1.0 B parameters, 0.19 B active
"""

from __future__ import annotations

from pathlib import Path

SHAPES = ("dense-185m", "llama-0.5b", "moe-small", "llama-1b", "moe-1b")


def build(shape: str, folder: Path, data_dir: Path, tokenizer: Path | None = None) -> Path:
    """The model ``shape`` as a BF16 folder; its tokenizer from ``tokenizer`` (a folder) or the bundled model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    if (folder / "config.json").exists():
        return folder
    tokenizer_source = tokenizer or bundled_tokenizer(data_dir)
    common = {"vocab_size": 49152, "max_position_embeddings": 4096, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    if shape == "dense-185m":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                             num_attention_heads=16, num_key_value_heads=4, **common))
    elif shape == "llama-0.5b":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, num_key_value_heads=4, **common))
    elif shape == "llama-1b":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                             num_attention_heads=32, num_key_value_heads=8, **common))
    elif shape == "moe-small":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            hidden_size=512, intermediate_size=1536, moe_intermediate_size=384, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
            decoder_sparse_step=1, norm_topk_prob=True, **common))
    elif shape == "moe-1b":  # more, larger experts than moe-small: a 30B-A3B's shape at a thirtieth of its size
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            hidden_size=1024, intermediate_size=3072, moe_intermediate_size=768, num_hidden_layers=12,
            num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
            decoder_sparse_step=1, norm_topk_prob=True, **common))
    else:
        raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    torch.manual_seed(0)
    for param in model.parameters():  # a realistic weight scale, so activations stay finite through the layers
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.02)
    model.to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    return folder


def bundled_tokenizer(data_dir: Path) -> Path:
    """The bundled model's tokenizer, from its BF16 checkpoint (made once in ``data_dir``)."""
    from qexplorer.core.artifacts import model_work_dir
    from qexplorer.core.catalog import Catalog
    from qexplorer.core.domain.events import drive
    from qexplorer.core.quantize.torch_quant import bf16_checkpoint

    bundled = Catalog().resolve("default")
    return drive(bf16_checkpoint(bundled, model_work_dir(data_dir, bundled)))
