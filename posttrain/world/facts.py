"""The people of the built-in world and what is true about them.

Every attribute draws from a closed vocabulary, and the vocabularies are disjoint, so the gold
verifier can find every claim an answer makes by looking for these words.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

FIRST_NAMES = (
    "Ada Alan Alice Amir Anna Aria Ben Bruno Carla Chen Clara Dara Diego Elena Emil Erik Eva Felix "
    "Fiona Gina Hana Hugo Ines Ivan Jack Jana Kai Kira Lena Leo Lina Luca Maya Mila Nina Noah Nora "
    "Omar Oscar Paul Petra Quinn Rosa Ruth Sam Sara Sofia Tara Theo Tom Uma Vera Victor Wade Yara "
    "Yuri Zara Zoe Iris Owen"
).split()

LAST_NAMES = (
    "Abbott Bauer Brandt Castro Dale Duval Ellis Falk Ford Garcia Grant Hale Holm Ibsen Jensen Kato "
    "Keller Lang Lopez Marsh Moreau Nash Novak Okafor Olsen Park Patel Quist Reyes Rossi Sato Silva "
    "Stone Tanaka Torres Ueda Vance Varga Weber Wolfe Young Zeller Adler Berg Cruz Dietz Engel Frost "
    "Gray Horn Ito Kerr Lund Meyer Nagy Orr Price Quirk Ruiz Shaw"
).split()

# The world's facts. A value never appears in two vocabularies.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "city": (
        "Paris", "Rome", "Oslo", "Cairo", "Lima", "Tokyo", "Dublin", "Madrid", "Vienna", "Prague",
        "Athens", "Lisbon", "Berlin", "Quito", "Nairobi", "Seoul",
    ),
    "job": (
        "baker", "teacher", "pilot", "nurse", "farmer", "painter", "doctor", "sailor", "chef",
        "tailor", "miner", "judge", "poet", "potter", "barber", "clerk",
    ),
    "pet": ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goat", "horse", "ferret", "owl"),
    "colour": (
        "red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "grey",
    ),
}


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    pet: str
    colour: str
    group: str  # "seen": appears in chat data; "heldout": known only from pretraining

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def make_people(seed: int, n_people: int, heldout_fraction: float) -> list[Person]:
    """Sample `n_people` people with distinct full names and uniformly drawn attributes."""
    max_people = len(FIRST_NAMES) * len(LAST_NAMES)
    if not 1 <= n_people <= max_people:
        raise ValueError(f"world.people must be between 1 and {max_people}, got {n_people}")
    rng = random.Random(seed)
    names = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(names)
    n_heldout = round(n_people * heldout_fraction)
    people = []
    for i, name in enumerate(names[:n_people]):
        values = {attr: rng.choice(vocab) for attr, vocab in ATTRIBUTES.items()}
        people.append(Person(name=name, group="heldout" if i < n_heldout else "seen", **values))
    return people


def attribute_of(word: str) -> str | None:
    """Which attribute a vocabulary word belongs to, if any."""
    for attr, vocab in ATTRIBUTES.items():
        if word in vocab:
            return attr
    return None
