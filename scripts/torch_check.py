"""Why torch cannot use the GPU that nvidia-smi lists, in one sentence.

Set-up runs `python scripts/torch_check.py` with the python of the environment to check, only
where `nvidia-smi -L` lists a GPU (scripts/gpu.sh: check_torch_cuda). It prints nothing and exits 0
when torch sees CUDA; otherwise it prints which fix applies on stderr and exits 1:

- torch is a CPU build (torch.version.cuda is None): install a CUDA build;
- torch's CUDA is newer than the driver supports (a cu130 torch needs driver 580 or newer; H100
  hosts often have older ones): upgrade the driver, or install the CUDA 12 (cu126) build;
- anything else (no device node, CUDA_VISIBLE_DEVICES, a container without --gpus): where to look.

Plain functions over plain facts, so tests feed them fake versions.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass

# PyTorch's wheel index per CUDA major version of the driver. NVIDIA's minor-version compatibility
# lets a CUDA 12.x build run on any CUDA 12 driver (525 or newer); a CUDA 13.x build needs driver
# 580. cu126 is the CUDA 12 build PyTorch publishes for every release from 2.10 to 2.13 (cu128 and
# cu129 come and go).
WHEEL_TAG_BY_CUDA_MAJOR = {13: "cu130", 12: "cu126"}
CUDA_13_DRIVER = 580


@dataclass(frozen=True)
class TorchFacts:
    version: str  # torch.__version__, e.g. "2.13.0+cpu"
    cuda: str | None  # torch.version.cuda, e.g. "13.0"; None for a CPU build
    cuda_available: bool  # torch.cuda.is_available()
    prefix: str  # sys.prefix of the environment it lives in


@dataclass(frozen=True)
class DriverFacts:
    version: str | None  # "550.54.15"
    cuda: tuple[int, int] | None  # the newest CUDA the driver supports, from nvidia-smi's header


def parse_cuda(text: str | None) -> tuple[int, int] | None:
    """Parse "12.9" into (12, 9); None or anything else into None."""
    match = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def driver_facts(nvidia_smi_text: str) -> DriverFacts:
    """The driver version and its CUDA version from plain `nvidia-smi` output (its header line)."""
    version = re.search(r"Driver Version:\s*([\d.]+)", nvidia_smi_text)
    cuda = re.search(r"CUDA Version:\s*(\d+\.\d+)", nvidia_smi_text)
    return DriverFacts(version.group(1) if version else None, parse_cuda(cuda.group(1)) if cuda else None)


def _pip_command(torch_: TorchFacts, wheel_tag: str) -> str:
    base_version = torch_.version.split("+", 1)[0]
    return (
        f"`{torch_.prefix}/bin/pip install torch=={base_version} "
        f"--index-url https://download.pytorch.org/whl/{wheel_tag}`"
    )


def _show(cuda: tuple[int, int]) -> str:
    return f"{cuda[0]}.{cuda[1]}"


def diagnose(torch_: TorchFacts, driver: DriverFacts) -> str | None:
    """One sentence saying which fix applies, or None when torch can use the GPU."""
    if torch_.cuda_available:
        return None
    driver_name = f"NVIDIA driver {driver.version}" if driver.version else "NVIDIA driver"
    torch_cuda = parse_cuda(torch_.cuda)
    if torch_cuda is None:
        if driver.cuda is None:
            build = (
                f"{_pip_command(torch_, WHEEL_TAG_BY_CUDA_MAJOR[13])}, or the {WHEEL_TAG_BY_CUDA_MAJOR[12]} "
                f"index on a driver older than {CUDA_13_DRIVER}"
            )
        elif driver.cuda[0] in WHEEL_TAG_BY_CUDA_MAJOR:
            build = _pip_command(torch_, WHEEL_TAG_BY_CUDA_MAJOR[driver.cuda[0]])
        else:
            return (
                f"torch {torch_.version} is a CPU build and the {driver_name} (CUDA {_show(driver.cuda)}) is "
                f"too old for any current CUDA build of torch, so everything will run on the CPU: upgrade "
                f"the driver ({CUDA_13_DRIVER} or newer), install a CUDA build of torch and run set-up again."
            )
        return (
            f"torch {torch_.version} is a CPU build, so everything will run on the CPU although "
            f"nvidia-smi lists a GPU: install a CUDA build ({build}) and run set-up again."
        )
    if driver.cuda is not None and driver.cuda[0] < torch_cuda[0]:
        fix = f"upgrade the driver ({CUDA_13_DRIVER} or newer for CUDA 13)"
        if driver.cuda[0] in WHEEL_TAG_BY_CUDA_MAJOR:
            tag = WHEEL_TAG_BY_CUDA_MAJOR[driver.cuda[0]]
            fix += f" or install the {tag} build of torch ({_pip_command(torch_, tag)})"
        return (
            f"torch {torch_.version} is built for CUDA {torch_.cuda} but this {driver_name} supports "
            f"CUDA {_show(driver.cuda)} at most, so everything will run on the CPU: {fix}, then run "
            f"set-up again."
        )
    supported = f"supports CUDA {_show(driver.cuda)}" if driver.cuda else "was not read from nvidia-smi"
    return (
        f"torch {torch_.version} is built for CUDA {torch_.cuda} and the {driver_name} {supported}, yet "
        f"torch.cuda.is_available() is False: check CUDA_VISIBLE_DEVICES and that /dev/nvidia* is "
        f"readable (a container needs --gpus all); `python -c 'import torch; torch.cuda.init()'` "
        f"prints the reason."
    )


def _nvidia_smi_text() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> int:
    try:
        import torch
    except ImportError:
        print(f"setup: WARNING: torch is not installed in {sys.prefix}; run set-up again.", file=sys.stderr)
        return 1
    facts = TorchFacts(
        version=torch.__version__,
        cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        prefix=sys.prefix,
    )
    message = diagnose(facts, driver_facts(_nvidia_smi_text()))
    if message is None:
        return 0
    print(f"setup: WARNING: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
