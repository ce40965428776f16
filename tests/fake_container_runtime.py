"""A fake ``docker`` / ``podman`` for the container mode's tests: ``run`` records its arguments and runs the contract
fake of ``vllm serve`` (tests/fake_vllm_serve.py) with what follows ``--entrypoint vllm IMAGE``; ``rm -f NAME``
stops the container of that name. State lives in ``$FAKE_RUNTIME_DIR``."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_RUNTIME_DIR"])


def main(argv: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "calls.jsonl", "a") as calls:
        calls.write(json.dumps(argv) + "\n")
    if argv[:1] == ["rm"]:
        pid_file = STATE / f"{argv[-1]}.pid"
        if not pid_file.exists():
            print(f"Error response from daemon: No such container: {argv[-1]}", file=sys.stderr)
            return 1
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file.unlink()
        return 0
    if argv[:1] == ["run"]:
        name = argv[argv.index("--name") + 1]
        entry = argv.index("--entrypoint")
        assert argv[entry + 1] == "vllm", argv
        serve_args = argv[entry + 3:]  # after the image: "serve ARTIFACT --host ..."
        (STATE / f"{name}.pid").write_text(str(os.getpid()))
        fake = Path(__file__).with_name("fake_vllm_serve.py")
        os.execv(sys.executable, [sys.executable, str(fake), *serve_args])
    print(f"fake runtime: unsupported {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
