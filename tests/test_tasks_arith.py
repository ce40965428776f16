"""The arithmetic-chains probe: deterministic items whose prompts and answers agree."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from qexplorer.core.tasks import arith


def _solve_prompt(prompt: str) -> int:
    """The answer worked out from the prompt's words alone, independently of the item's steps."""
    value = int(re.match(r"Start with (\d+)\.", prompt).group(1))
    for verb, number in re.findall(r"(Add|Subtract|Multiply by|Divide by) (\d+)\.", prompt):
        operand = int(number)
        if verb == "Add":
            value += operand
        elif verb == "Subtract":
            value -= operand
        elif verb == "Multiply by":
            value *= operand
        else:
            assert value % operand == 0, f"inexact division in {prompt!r}"
            value //= operand
    return value


def test_items_are_deterministic_given_the_seed():
    first = arith.generate(seed=7, max_length=5, items_per_length=4)
    assert first == arith.generate(seed=7, max_length=5, items_per_length=4)
    assert first != arith.generate(seed=8, max_length=5, items_per_length=4)


def test_every_length_has_its_items():
    items = arith.generate(max_length=6, items_per_length=3)
    assert Counter(item.length for item in items) == {length: 3 for length in range(1, 7)}
    assert len({item.item_id for item in items}) == len(items)
    assert [item.length for item in items] == sorted(item.length for item in items)


def test_each_answer_is_the_chain_worked_out():
    for item in arith.generate(max_length=10, items_per_length=30):
        assert item.answer == arith.evaluate(item) == _solve_prompt(item.prompt)
        assert item.prompt.endswith("Answer with the number only.")
        value = item.start
        for step in item.steps:
            value = step.apply(value)
            assert 0 <= value <= arith.MAX_VALUE  # whole, never negative, never large


def test_division_only_when_exact():
    with pytest.raises(ValueError):
        arith.Step("divide", 4).apply(10)
    divisions = [step for item in arith.generate(max_length=8, items_per_length=30) for step in item.steps
                 if step.operation == "divide"]
    assert divisions  # the generator does use division


@pytest.mark.parametrize(("text", "expected"), [
    ("42", 42),
    ("The answer is 42.", 42),
    ("7 + 3 = 10", 10),
    ("Step 1: 12 × 3 = 36\nStep 2: 36 - 4 = 32\n**Answer: 32**", 32),
    ("= 1,234", 1234),
    ("-7", -7),
    ("The result is \u221215.", -15),
    ("10.0", 10),
    ("3.5", None),
    ("I cannot compute that.", None),
    ("", None),
    ("1, 2, 3", 3),
])
def test_extract_answer(text: str, expected: int | None):
    assert arith.extract_answer(text) == expected
