"""The people of the built-in world and what is true about them.

Every attribute draws from a closed vocabulary, and the vocabularies are disjoint, so the gold
verifier can find every claim an answer makes by looking for these words.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

# Every person has a different first name (people share last names). With shared first names, a
# small model fine-tuned on chats about some people "snaps" to them: asked about Rosa Keller it
# answers about the Rosa it saw in the chats, which measures name copying, not knowledge.
FIRST_NAMES = (
    "Aaron Abel Abigail Ada Adam Adele Adrian Agnes Aidan Aisha Alan Albert Alexa Alfred Alice Alma Alvin Amara "
    "Amber Amelia Amir Amos Anders Andrea Angela Anita Anna Anton Arlo Arthur Astrid Audrey August Aurora Axel "
    "Beatrice Bella Benno Bernard Bianca Boris Brenda Bruno Caleb Calvin Camila Carla Carmen Casper Cecil Celia Chen "
    "Chloe Clara Claude Colin Conrad Cora Cyrus Dalia Damian Dana Daniel Daphne Darius Dave Delia Denis Diana Diego "
    "Dina Dmitri Dora Dylan Edgar Edith Edwin Eileen Elena Eli Elias Eliza Ella Elmer Elsa Emil Emma Enzo Erik Esme "
    "Esther Ethan Eva Evelyn Ezra Fabian Farah Felix Fern Fiona Flora Floyd Frida Gabriel Gemma George Gerald Gia "
    "Gideon Gina Gloria Gordon Greta Gus Gwen Hana Hans Harold Harriet Hector Heidi Helga Henry Hilda Hugo Ian Ida "
    "Igor Ilse Imani Ines Ingrid Irene Isaac Isla Ivan Ivy Jack Jade Jalen Jana Jasper Javier Jean Jenna Jesse Joan "
    "Joel Jonah Joy Judith Jules Julia Kai Karim Karl Kate Keith Kenji Kevin Kira Klaus Kurt Lana Lars Laura Leah "
    "Lena Leo Leon Lila Lina Linus Lisa Lloyd Lola Lorenzo Louis Luca Lucia Luis Luna Lydia Mabel Magnus Maia Malik "
    "Marco Maria Marius Marta Mateo Matilda Max Maya Mei Mila Miles Milo Mina Mira Moses Nadia Naomi Nate Neil Nell "
    "Nico Nina Noah Noel Nora Norman Olaf Olga Oliver Omar Oscar Otto Owen Pablo Pamela Paul Pearl Pedro Penny Peter "
    "Petra Philip Pia Priya Quentin Quinn Rafael Rahul Ralph Ramon Raquel Ray Rebecca Reza Rhea Rita Robin Rocco "
    "Roland Rosa Ruben Rufus Ruth Sabine Sadie Salma Sam Samira Sara Saul Selma Seth Silas Simon Sofia Sonia Stella "
    "Stefan Sven Sylvia Talia Tamara Tara Ted Thea Theo Tilda Tobias Tom Tristan Uma Ulrich Ursula Valeria Vera "
    "Victor Viktor Vince Viola Wade Walter Wanda Wendy Wes Willa Xavier Yara Yasmin Yuki Yuri Zach Zara Zelda Zoe Zora"
).split()

LAST_NAMES = (
    "Abbott Bauer Brandt Castro Dale Duval Ellis Falk Ford Garcia Grant Hale Holm Ibsen Jensen Kato "
    "Keller Lang Lopez Marsh Moreau Nash Novak Okafor Olsen Park Patel Quist Reyes Rossi Sato Silva "
    "Stone Tanaka Torres Ueda Vance Varga Weber Wolfe Young Zeller Adler Berg Cruz Dietz Engel Frost "
    "Gray Horn Ito Kerr Lund Meyer Nagy Orr Price Quirk Ruiz Shaw"
).split()

# Strangers: people who are not of the world. Pretraining notes about them state their facts and
# then refer back to them; each note gives a stranger new facts, so the only way to predict such a
# reference is to read it from the context, never to remember it.
STRANGERS = ("Kaia Birch", "Nils Crane", "Odile Doyle", "Rune Fenwick", "Liv Hart", "Cato Quill",
             "Edda Rook", "Ansel Thorne")

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
    """Sample `n_people` people (distinct first names, shared last names, uniform attributes)."""
    if not 1 <= n_people <= len(FIRST_NAMES):
        raise ValueError(f"world.people must be between 1 and {len(FIRST_NAMES)}, got {n_people}")
    rng = random.Random(seed)
    firsts = list(FIRST_NAMES)
    rng.shuffle(firsts)
    n_heldout = round(n_people * heldout_fraction)
    people = []
    for i, first in enumerate(firsts[:n_people]):
        name = f"{first} {rng.choice(LAST_NAMES)}"
        values = {attr: rng.choice(vocab) for attr, vocab in ATTRIBUTES.items()}
        people.append(Person(name=name, group="heldout" if i < n_heldout else "seen", **values))
    return people


def attribute_of(word: str) -> str | None:
    """Which attribute a vocabulary word belongs to, if any."""
    for attr, vocab in ATTRIBUTES.items():
        if word in vocab:
            return attr
    return None
