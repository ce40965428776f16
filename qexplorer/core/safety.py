"""Safe defaults: what qexplorer refuses to load unless asked, and how it stays offline.

* A checkpoint whose config names custom code (``auto_map``) would run that code
  when loaded: refused unless ``--trust-remote-code``.
* A pickle-only checkpoint (``pytorch_model.bin``) can run arbitrary code when
  unpickled: refused unless ``--allow-pickle``.
* No model hub is contacted unless ``--allow-download``: the hub libraries are
  put in offline mode for the process and every worker.
* Files qexplorer writes are the user's alone (umask 077 in workers, 0600 / 0700
  on what the parent creates).
"""

from __future__ import annotations

import os

from qexplorer.core.errors import UserError
from qexplorer.core.model import ModelSpec

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def check_loadable(spec: ModelSpec, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    if spec.needs_remote_code and not trust_remote_code:
        raise UserError(f"{spec.name} needs custom code from its repository (trust_remote_code) to load; "
                        "qexplorer refuses that by default - pass --trust-remote-code if you trust its author.")
    if spec.weights_format == "pickle" and not allow_pickle:
        raise UserError(f"{spec.name} has only pickle weights (pytorch_model.bin), which can run code when "
                        "loaded; convert it to safetensors or pass --allow-pickle if you trust it.")


def go_offline(allow_download: bool = False) -> None:
    """Put huggingface_hub / transformers / datasets in offline mode for this process and its children."""
    if not allow_download:
        for key, value in OFFLINE_ENV.items():
            os.environ[key] = value
