"""Hugging Face precisions: one artifact each, the folder the user will serve.

* bf16 - the model's BF16 checkpoint (for a GGUF model: dequantized once, cached);
  fp16 / fp32 - that checkpoint saved in the other dtype.
* fp8 (FP8_DYNAMIC), int8 (W8A8), nvfp4a16 (NVFP4A16) - llm-compressor preset
  schemes, data-free; nvfp4 (W4A4) - the NVFP4 preset, calibrated for its
  activation scales.
* int4_rtn / gptq / awq - W4A16 with a group size that divides every row:
  round-to-nearest (data-free), GPTQ or AWQ (calibrated on the text shipped in
  ``qexplorer/data/calibration.txt`` and standard-library code).

Every quantized artifact is a compressed-tensors folder that ``vllm serve``
loads as it is; benchmark, quality and export all use that one folder
(:func:`produce_artifact`), made once per model file and reused.

Every function that takes a while is a generator of job events (and returns
what it made) so that the worker can report progress.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

from qexplorer.core.artifacts import file_lock
from qexplorer.core.domain.events import JobEvent, Log, Metric, Phase
from qexplorer.core.domain.phases import PhaseKind
from qexplorer.core.kinds import ModelFormat, Producer
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TRUST_REMOTE_CODE = False  # set per job from JobSpec.trust_remote_code; never on by default
CALIBRATION_FILE = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"
# Modules every llm-compressor recipe leaves in BF16: the output head and the MoE routers (one list, so no
# scheme can quantize a router that another keeps). A vLLM maintainer: "Typically the gate weight should be
# ignored during quantization because it yields bad accuracy"
# (https://github.com/vllm-project/vllm/pull/22017), and llm-compressor's own MoE examples all ignore it
# (examples/quantizing_moe/{qwen,mixtral,deepseek_r1}_example.py, examples/awq/qwen3_next_example.py):
#   mlp.gate               the router of Qwen2-MoE, Qwen3-MoE, Mixtral (transformers 5), DeepSeek, GLM-4-MoE
#   mlp.shared_expert_gate Qwen2-MoE / Qwen3-Next's shared-expert gate, an nn.Linear(hidden, 1) in
#                          transformers 5 - the one router a `targets="Linear"` recipe does reach there
#   block_sparse_moe.gate  Mixtral's router in transformers 4 (an nn.Linear then)
# Transformers 5 makes most routers a TopKRouter module that is not an nn.Linear, so `targets="Linear"` skips
# them anyway (llm-compressor's note in examples/awq/qwen3_moe_example.py); the list keeps them BF16 where a
# model or an older transformers still makes them Linear. A pattern that matches nothing is harmless.
KEEP_BF16 = ("lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$", "re:.*block_sparse_moe.gate$")


def quiet_libraries() -> None:
    """Keep library chatter (torchao's .so probes, progress bars) out of event streams."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("llmcompressor").setLevel(logging.ERROR)


def tensor_storage_bytes(tensor: Any) -> int:
    """Bytes a tensor really holds, looking inside torchao's tensor subclasses."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:  # tied embeddings count once
            continue
        seen.add(id(tensor))
        total += tensor_storage_bytes(tensor)
    return total


BF16_CHECKPOINT = "bf16-checkpoint"  # a GGUF model dequantized once, under the model's work dir


def saved_folder(folder: Path) -> bool:
    """A finished Hugging Face save: its config and at least one safetensors shard."""
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def artifact_dir(precision: Precision, work_dir: Path) -> Path:
    """Where :func:`produce_artifact` keeps ``precision``'s folder (BF16 itself is the checkpoint it starts from)."""
    if precision.producer == Producer.CAST and precision.key == "bf16":
        return work_dir / BF16_CHECKPOINT
    suffix = "checkpoint" if precision.producer == Producer.CAST else "compressed-tensors"
    return work_dir / f"{precision.key}-{suffix}"


def bf16_checkpoint(spec: ModelSpec, cache_dir: Path) -> Generator[JobEvent, None, Path]:
    """The model as a BF16 Hugging Face folder: itself, or (for GGUF) dequantized once and cached.

    Two jobs (say the CLI and the app) that need it at once: the second waits for the first's lock and
    then finds the finished folder."""
    if spec.format == ModelFormat.HF and not needs_bf16_cast(spec):
        return Path(spec.path)  # BF16 already, or a quantized checkpoint measured as stored (labelled so)
    target = cache_dir / BF16_CHECKPOINT
    with file_lock(target.with_name(target.name + ".lock")):
        if saved_folder(target):
            yield Log(f"using the cached BF16 checkpoint {target}")
            return target
        if spec.format == ModelFormat.HF:  # an FP16 / FP32 folder: the BF16 artifact is a cast, not the source
            yield Phase(PhaseKind.DEQUANTIZE, f"casting the {spec.stored_dtype} checkpoint to BF16 (once)")
            model, tokenizer = load_model(Path(spec.path), "bf16")
            _save_folder(model, tokenizer, target)
            del model
        else:
            yield Phase(PhaseKind.DEQUANTIZE, f"dequantizing {Path(spec.path).name} to a BF16 checkpoint (once)")
            _dequantize(spec, target)
        yield Log(f"cached the BF16 checkpoint in {target}")
        return target


def needs_bf16_cast(spec: ModelSpec) -> bool:
    """A Hugging Face folder stored in FP16 or FP32: its BF16 artifact is a cast (a quantized one is kept)."""
    return (spec.format == ModelFormat.HF and not spec.stored_quantized
            and spec.stored_dtype.upper() not in ("BF16", "BFLOAT16"))


def _dequantize(spec: ModelSpec, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(spec.path)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # a byte-level BPE vocabulary is rebuilt from the file alone; transformers' own GGUF tokenizer import
    # (7 s for the bundled model) only where it is not one, or the file lacks what the rebuild reads
    tokenizer = gpt2_tokenizer_from_gguf(gguf, None)
    if tokenizer is None:
        imported = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = gpt2_tokenizer_from_gguf(gguf, imported) or imported
    # Saved as a plain checkpoint: the GGUF quantizer would otherwise be recorded in the config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save_folder(model, tokenizer, target)
    del model


def _save_folder(model: Any, tokenizer: Any, out: Path, compressed: bool = False) -> None:
    """Write model and tokenizer under a .partial name, then rename: never a half-written folder under ``out``."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if compressed:
        model.save_pretrained(partial, save_compressed=True)
    else:
        model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def gpt2_tokenizer_from_gguf(gguf: Path, imported: Any) -> Any | None:
    """For a GGUF whose vocabulary is byte-level BPE (``tokenizer.ggml.model = gpt2``): the tokenizer as the
    original Hugging Face one was - byte-level BPE from the file's tokens and merges, digits split one by one.

    transformers' GGUF import writes such a vocabulary as a SentencePiece-style BPE with byte fallback, which
    llama.cpp's own converter then turns into a "llama" vocabulary that llama.cpp cannot tokenize with
    (it aborts). Rebuilt this way, the tokenizer splits text exactly as llama.cpp does with the GGUF (checked on
    prose and code of the bundled model) and converts back to the same vocabulary. None: not such a GGUF.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf))

    def strings(name: str) -> list[str]:
        field = reader.fields[name]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def number(name: str) -> int | None:
        field = reader.fields.get(name)
        return int(field.parts[-1][0]) if field is not None else None

    if "tokenizer.ggml.model" not in reader.fields or strings("tokenizer.ggml.model") != ["gpt2"]:
        return None
    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    types = reader.fields["tokenizer.ggml.token_type"]
    control = [tokens[i] for i, index in enumerate(types.data) if int(types.parts[index][0]) == 3]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def token(name: str) -> str | None:
        index = number(name)
        return tokens[index] if index is not None and index < len(tokens) else None

    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=token("tokenizer.ggml.bos_token_id"),
                                   eos_token=token("tokenizer.ggml.eos_token_id"),
                                   unk_token=token("tokenizer.ggml.unknown_token_id"),
                                   pad_token=token("tokenizer.ggml.padding_token_id"))
    if imported is None:  # from the file: what transformers' import would have read from the same fields
        if "tokenizer.ggml.add_bos_token" not in reader.fields:
            return None  # transformers' import decides the default: let it
        template = reader.fields.get("tokenizer.chat_template")
        fast.chat_template = bytes(template.parts[template.data[0]]).decode("utf-8") if template else None
        fast.add_bos_token = bool(reader.fields["tokenizer.ggml.add_bos_token"].parts[-1][0])
        return fast
    fast.chat_template = getattr(imported, "chat_template", None)
    fast.add_bos_token = bool(getattr(imported, "add_bos_token", False))
    return fast


def load_model(folder: Path, dtype_name: str = "bf16", device: str = "cpu") -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, DTYPES.get(dtype_name, "bfloat16"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                 trust_remote_code=TRUST_REMOTE_CODE).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=TRUST_REMOTE_CODE)
    return model, tokenizer


def produce_artifact(spec: ModelSpec, precision: Precision, work_dir: Path) -> Generator[JobEvent, None, Path]:
    """The folder that serves ``precision``: made once (under a lock), then reused by every job and the export."""
    source = yield from bf16_checkpoint(spec, work_dir)
    if precision.producer == Producer.CAST and precision.key == "bf16":
        return source
    out = artifact_dir(precision, work_dir)
    with file_lock(out.with_name(out.name + ".lock")):
        if saved_folder(out):
            yield Log(f"reusing the {precision.label} artifact {out.name}")
            return out
        yield Phase(PhaseKind.QUANTIZE, precision.method)
        if precision.producer == Producer.CAST:
            _save_cast(source, out, precision.key)
        elif precision.scheme is not None:
            yield from llmcompressor_scheme(source, out, precision.scheme, calibrate=precision.needs_calibration,
                                            moe=spec.is_moe)
        else:
            yield from llmcompressor_quantize(source, out, precision, spec)
    return out


def _save_cast(source: Path, out: Path, dtype_name: str) -> None:
    model, tokenizer = load_model(source, dtype_name)
    _save_folder(model, tokenizer, out)


# Standard-library modules for calibration: none of them is in the evaluation corpus (quality.STDLIB_FILES).
CALIBRATION_STDLIB = ("functools.py", "inspect.py", "typing.py", "json/encoder.py", "json/decoder.py",
                      "collections/__init__.py", "pathlib.py", "enum.py")


def calibration_texts(limit: int = 32, chars: int = 1000) -> list[str]:
    """Prose shipped with qexplorer (calibration.txt) and standard-library code, ~256 tokens per sample.

    GPTQ and AWQ need more than a few paragraphs: with 8 short samples GPTQ did worse than
    round-to-nearest on the bundled model. Nothing here overlaps the evaluation text.
    """
    import sysconfig

    text = CALIBRATION_FILE.read_text(encoding="utf-8")
    samples = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CALIBRATION_STDLIB:
        path = stdlib / name
        if path.exists():
            source = path.read_text(encoding="utf-8")
            samples += [source[i:i + chars] for i in range(0, min(len(source), 8 * chars), chars)]
    # interleave prose and code so that any prefix of the list has both
    prose, code = samples[:10], samples[10:]
    mixed = [item for pair in zip(prose, code, strict=False) for item in pair] + code[len(prose):]
    return mixed[:limit]


def _patch_awq_for_cpu() -> None:
    """llm-compressor's AWQ pins memory even without an accelerator and fails on CPU
    ("Cannot access accelerator device"); pinning is an optimisation, so it is
    skipped when no CUDA device exists (FACTS §7)."""
    import torch

    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    if hasattr(IntermediatesCache, "pin_memory"):
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]


def llmcompressor_quantize(folder: Path, out_dir: Path, precision: Precision, spec: ModelSpec,
                           samples: int = 32, max_seq_len: int = 256) -> Iterator[JobEvent]:
    """W4A16 (RTN / GPTQ / AWQ) with llm-compressor; writes a compressed-tensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    group = precision.group_size(spec) or 128
    weights = {"num_bits": 4, "type": "int", "symmetric": precision.key != "awq", "strategy": "group",
               "group_size": group}
    config_groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    ignore = list(KEEP_BF16)
    if precision.key == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe: Any = GPTQModifier(config_groups=config_groups, ignore=ignore)
    elif precision.key == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        _patch_awq_for_cpu()
        recipe = AWQModifier(config_groups=config_groups, ignore=ignore)
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe = QuantizationModifier(config_groups=config_groups, ignore=ignore)

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                 trust_remote_code=TRUST_REMOTE_CODE)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=TRUST_REMOTE_CODE)
    kwargs: dict[str, Any] = {}
    if precision.needs_calibration:
        kwargs = _calibration_kwargs(tokenizer, samples, max_seq_len)
        yield Log(f"calibrating on {kwargs['num_calibration_samples']} samples of prose ({CALIBRATION_FILE.name}) "
                  f"and standard-library code (≤ {max_seq_len} tokens each), group size {group}")
    yield from _oneshot(model, recipe, kwargs, moe=spec.is_moe)
    _save_folder(model, tokenizer, out_dir, compressed=True)
    del model


def llmcompressor_scheme(folder: Path, out_dir: Path, scheme: str, calibrate: bool = False, moe: bool = False,
                         samples: int = 32, max_seq_len: int = 256) -> Iterator[JobEvent]:
    """A preset scheme (FP8_DYNAMIC, W8A8, NVFP4A16; NVFP4 calibrated) written as a compressed-tensors folder."""
    import torch
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                 trust_remote_code=TRUST_REMOTE_CODE)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=TRUST_REMOTE_CODE)
    kwargs: dict[str, Any] = {}
    if calibrate:
        kwargs = _calibration_kwargs(tokenizer, samples, max_seq_len)
        yield Log(f"calibrating {scheme} on {kwargs['num_calibration_samples']} samples (≤ {max_seq_len} tokens)")
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=list(KEEP_BF16))
    yield from _oneshot(model, recipe, kwargs, moe=moe)
    _save_folder(model, tokenizer, out_dir, compressed=True)
    del model


def _oneshot(model: Any, recipe: Any, kwargs: dict[str, Any], moe: bool) -> Iterator[JobEvent]:
    """llm-compressor's oneshot, timed, and what it did with a MoE's experts.

    Transformers 5 stores experts as fused 3-D parameters, not nn.Linear; oneshot replaces each fused block it
    recognises with LinearExperts2D (one Linear per expert) before quantizing, and with calibration data runs
    every expert on every token (``moe_calibrate_all_experts``) so none is left uncalibrated
    (llmcompressor/entrypoints/oneshot.py, modeling/moe/linearize.py). A block it did not recognise stays
    fused and BF16 - quantized by nothing - which the artifact's size check then refuses."""
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import get_linearized_moes, get_non_linearized_moes

    fused = sorted({type(module).__name__ for _, module in get_non_linearized_moes(model)})
    calibrated = "dataset" in kwargs
    if calibrated:
        kwargs = {**kwargs, "moe_calibrate_all_experts": True}  # the default, asked for since the log says so
    started = time.perf_counter()
    oneshot(model=model, recipe=recipe, **kwargs)
    yield Metric("oneshot_s", time.perf_counter() - started, "s")
    linearized = get_linearized_moes(model)
    left = get_non_linearized_moes(model)
    if linearized:
        yield Log(f"MoE: llm-compressor linearized {len(linearized)} expert blocks ({', '.join(fused) or 'fused'} → "
                  f"{type(linearized[0][1]).__name__})"
                  + ("; every expert calibrated on every token (moe_calibrate_all_experts)" if calibrated else ""))
    if left:
        yield Log(f"MoE: {len(left)} expert blocks ({', '.join(sorted({type(m).__name__ for _, m in left}))}) "
                  "stayed fused: llm-compressor did not quantize them, so they stay BF16", level="warning")
    elif moe and not linearized and calibrated:
        yield Log("MoE: llm-compressor applied no MoE calibration module to this model's experts: each expert is "
                  "calibrated only on the tokens routed to it, and one that no calibration token reaches is "
                  "quantized from its weights alone", level="warning")


def _calibration_kwargs(tokenizer: Any, samples: int, max_seq_len: int) -> dict[str, Any]:
    from datasets import Dataset

    texts = calibration_texts(samples)
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=max_seq_len), remove_columns=["text"])
    return {"dataset": dataset, "num_calibration_samples": len(texts), "max_seq_length": max_seq_len}
