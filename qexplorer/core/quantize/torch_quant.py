"""Torch precisions: a BF16 Hugging Face checkpoint, then a cast or a quantizer.

* fp32 / bf16 / fp16 - a cast at load time.
* int8 (weight-only) and fp8 - ``torchao.quantize_`` in memory. FP8 uses FP8
  tensor cores with dynamic activation scaling on CUDA CC ≥ 8.9, and
  weight-only FP8 (upcast per matmul: "emulated") elsewhere.
* int4 RTN - ``torchao`` ``Int4WeightOnlyConfig`` on CUDA; torchao 0.18 has no
  CPU INT4 path, so on CPU the same round-to-nearest W4A16 scheme comes from
  llm-compressor's data-free ``QuantizationModifier`` ("emulated": the
  compressed-tensors checkpoint is decompressed to BF16 to run).
* gptq / awq - llm-compressor ``oneshot`` with the calibration text shipped in
  ``qexplorer/data/calibration.txt``; saved as a compressed-tensors folder that
  ``vllm serve`` loads.

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
from qexplorer.core.jobs.events import JobEvent, Log, Metric, Phase
from qexplorer.core.kinds import ModelFormat
from qexplorer.core.model import ModelSpec
from qexplorer.core.precisions import Precision

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TRUST_REMOTE_CODE = False  # set per job from JobSpec.trust_remote_code; never on by default
CALIBRATION_FILE = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"


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


def bf16_checkpoint(spec: ModelSpec, cache_dir: Path) -> Generator[JobEvent, None, Path]:
    """The model as a BF16 Hugging Face folder: itself, or (for GGUF) dequantized once and cached.

    Two jobs (say the CLI and the app) that need it at once: the second waits for the first's lock and
    then finds the finished folder."""
    if spec.format == ModelFormat.HF:
        return Path(spec.path)
    target = cache_dir / "bf16-checkpoint"
    with file_lock(target.with_name(target.name + ".lock")):
        if (target / "config.json").exists() and any(target.glob("*.safetensors")):
            yield Log(f"using the cached BF16 checkpoint {target}")
            return target
        yield Phase("dequantize", f"dequantizing {Path(spec.path).name} to a BF16 checkpoint (once)")
        _dequantize(spec, target)
        yield Log(f"cached the BF16 checkpoint in {target}")
        return target


def _dequantize(spec: ModelSpec, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(spec.path)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Saved as a plain checkpoint: the GGUF quantizer would otherwise be recorded in the config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    del model


def load_model(folder: Path, dtype_name: str = "bf16", device: str = "cpu") -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, DTYPES.get(dtype_name, "bfloat16"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                 trust_remote_code=TRUST_REMOTE_CODE).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=TRUST_REMOTE_CODE)
    return model, tokenizer


def torchao_quantize(model: Any, precision: Precision, spec: ModelSpec, cuda_cc: tuple[int, int] | None) -> str:
    """Quantize ``model`` in place with torchao; returns how it runs ("native" / "emulated")."""
    from torchao.quantization import quantize_

    if precision.key == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig())
        return "native"
    if precision.key == "fp8":
        if cuda_cc is not None and cuda_cc >= (8, 9):
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            return "native"
        from torchao.quantization import Float8WeightOnlyConfig

        quantize_(model, Float8WeightOnlyConfig())
        return "emulated"
    if precision.key == "int4_rtn":
        from torchao.quantization import Int4WeightOnlyConfig

        quantize_(model, Int4WeightOnlyConfig(group_size=precision.group_size(spec) or 128))
        return "native"
    raise ValueError(f"{precision.key} is not a torchao precision")


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
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    group = precision.group_size(spec) or 128
    weights = {"num_bits": 4, "type": "int", "symmetric": precision.key != "awq", "strategy": "group",
               "group_size": group}
    config_groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    ignore = ["lm_head"] + (["re:.*mlp.gate$"] if spec.is_moe else [])
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
        from datasets import Dataset

        texts = calibration_texts(samples)
        dataset = Dataset.from_dict({"text": texts})
        dataset = dataset.map(lambda row: tokenizer(row["text"], truncation=True, max_length=max_seq_len),
                              remove_columns=["text"])
        kwargs = {"dataset": dataset, "num_calibration_samples": len(texts), "max_seq_length": max_seq_len}
        yield Log(f"calibrating on {len(texts)} samples of prose ({CALIBRATION_FILE.name}) and "
                         f"standard-library code (≤ {max_seq_len} tokens each), group size {group}")
    started = time.perf_counter()
    oneshot(model=model, recipe=recipe, **kwargs)
    yield Metric("oneshot_s", time.perf_counter() - started, "s")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, save_compressed=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
    del model


def llmcompressor_scheme(folder: Path, out_dir: Path, scheme: str) -> Iterator[JobEvent]:
    """A data-free preset scheme (FP8_DYNAMIC, W8A16) written as a compressed-tensors folder for vLLM."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                 trust_remote_code=TRUST_REMOTE_CODE)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=TRUST_REMOTE_CODE)
    started = time.perf_counter()
    if scheme == "W8A16":
        # per-channel INT8 weights: the W8A16 preset groups by 128, which rows of 576 do not divide
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        recipe = QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                      ignore=["lm_head"])
    else:
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    yield Metric("oneshot_s", time.perf_counter() - started, "s")
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    del model
