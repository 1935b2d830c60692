"""Small skills the world teaches besides facts: adding digits, counting items, sorting numbers."""

from __future__ import annotations

import random

from posttrain.world.language import FRUITS

SKILLS = ("add", "count", "sort")


def sample_skill(rng: random.Random, skill: str) -> dict:
    """One skill instance: the question, the canonical answer, the expected result and corpus lines."""
    if skill == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        c = a + b
        return {
            "skill": skill,
            "question": f"What is {a} plus {b}?",
            "answer": f"{a} plus {b} is {c}.",
            "expected": str(c),
            "corpus": (f"{a} plus {b} is {c}.", f"Adding {a} and {b} gives {c}.", f"The sum of {a} and {b} is {c}."),
        }
    if skill == "count":
        n = rng.randint(2, 6)
        items = ", ".join(rng.sample(FRUITS, n))
        return {
            "skill": skill,
            "question": f"How many fruits are in this list: {items}?",
            "answer": f"There are {n} fruits in the list.",
            "expected": str(n),
            "corpus": (f"The list {items} has {n} fruits.", f"Counting {items} gives {n} fruits."),
        }
    if skill == "sort":
        xs = rng.sample(range(10), 3)
        shown, ordered = ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))
        return {
            "skill": skill,
            "question": f"Sort these numbers from small to large: {shown}.",
            "answer": f"From small to large: {ordered}.",
            "expected": ordered,
            "corpus": (f"Sorted from small to large, {shown} becomes {ordered}.",),
        }
    raise ValueError(f"unknown skill {skill!r}")


def wrong_result(rng: random.Random, item: dict) -> tuple[str, str]:
    """A plausible wrong answer to a skill question: (answer text, wrong result)."""
    if item["skill"] == "sort":
        nums = item["expected"].split(", ")
        while True:
            shuffled = rng.sample(nums, len(nums))
            if shuffled != nums:
                break
        wrong = ", ".join(shuffled)
        return item["answer"].replace(item["expected"], wrong), wrong
    right = int(item["expected"])
    wrong = str(right + rng.choice([-2, -1, 1, 2]) if right > 1 else right + rng.choice([1, 2]))
    # Replace the last occurrence: the result comes last in every skill answer.
    head, _, tail = item["answer"].rpartition(item["expected"])
    return head + wrong + tail, wrong
