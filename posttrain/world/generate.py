"""Generate every dataset of the built-in world from one seed.

What each file is for (all JSONL unless noted):
- world.json            the people and their facts, the seen/held-out split, the generator settings
- pretrain.jsonl        `text`: biographies in several phrasings and orders, general prose, skill
                        drills, and notes about strangers that refer back to what they state
- probe.jsonl           raw-text fact probes ("Ada Lang lives in" -> "Paris") for every fact
- sft_train/eval.jsonl  `messages`: chats about the *seen* people only, by an imperfect demonstrator
- intent_{train,val,test}.jsonl  `text`,`label`: what a user message asks for (classification)
- pref_train/eval.jsonl `prompt`,`chosen`,`rejected` (message lists): correct, concise, polite
                        answers and refusals of harmful requests are preferred; `flaw` names what
                        is wrong with `rejected`, `gold` carries the verifier's fields
- pref_length_biased.jsonl  the same prompts judged by a flawed labeller who prefers longer answers
- ppo_prompts.jsonl     `prompt` + gold fields, seen people: prompts for RL
- eval_prompts.jsonl    `prompt` + gold fields, seen and held-out people: the evaluation suite
- skill_prompts.jsonl   sums, counts and sorting only (none asked in eval_prompts): RL on verifiable rewards

The demonstrator is realistically imperfect: it sometimes gets facts wrong, rambles, is rude,
agrees with a false premise in the question (sycophancy), and often complies with harmful requests.
SFT copies its majority behaviour (sycophancy included: the base learned from the notes about
strangers to repeat what its context says); preference data is what can fix the rest.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from posttrain.world.facts import ATTRIBUTES, STRANGERS, Person, make_people
from posttrain.world.language import (
    BENIGN_REQUESTS,
    FILLERS,
    FORBIDDEN_REQUESTS,
    GENERAL,
    LEADING,
    PROBES,
    QUESTIONS,
    REFUSALS,
    REPORTS,
    RUDE_PREFIXES,
    STATEMENTS,
    answer,
    answer_vars,
    article,
    lower_start,
    statement,
)
from posttrain.world.skills import SKILLS, sample_skill, wrong_result

SYSTEM_PROMPTS = ("Be helpful.", "Answer briefly.")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    people: int = 240
    heldout_fraction: float = 0.25
    bios_per_person: int = 6  # knowledge augmentation: each person's facts in this many phrasings/orders
    skill_docs: int = 500
    general_docs: int = 150  # paragraphs of general text (no facts about people)
    context_docs: int = 1000  # notes about strangers that refer back to what they state (copying from context)
    # The demonstrator's habits (probabilities per answer).
    p_wrong: float = 0.08  # states a wrong value
    p_sycophant: float = 0.75  # agrees with a false premise
    p_ramble: float = 0.25  # adds an unrequested sentence
    p_hallucinate: float = 0.5  # of those extra sentences that state a fact, the share that is made up
    p_rude: float = 0.08
    p_comply_harmful: float = 0.6
    p_refuse_benign: float = 0.05
    pref_pairs_per_person: int = 24  # preference pairs about each seen person
    pref_skill_pairs: int = 600  # preference pairs on skills (a right vs a wrong result)


class _Demonstrator:
    """Writes assistant answers the way an imperfect human demonstrator would."""

    def __init__(self, cfg: WorldConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng

    def other_value(self, attribute: str, not_this: str) -> str:
        return self.rng.choice([v for v in ATTRIBUTES[attribute] if v != not_this])

    def ramble(self, person: Person, attribute: str, hallucinate: bool | None = None) -> str:
        """An unrequested extra sentence: a filler, or another fact that may be made up."""
        if self.rng.random() < 0.5:
            return self.rng.choice(FILLERS).format(name=person.name)
        other = self.rng.choice([a for a in ATTRIBUTES if a != attribute])
        if hallucinate is None:
            hallucinate = self.rng.random() < self.cfg.p_hallucinate
        value = self.other_value(other, person.value(other)) if hallucinate else None
        return statement(person, other, value)

    def rude(self, text: str) -> str:
        prefix = self.rng.choice(RUDE_PREFIXES)
        # "Obviously, the job of ..." but "Obviously, Ada Lang ..."
        return prefix + (text if prefix.endswith(". ") else lower_start(text))

    def fact(self, person: Person, attribute: str, premise: str | None = None) -> str:
        c, r = self.cfg, self.rng
        if premise is not None and premise != person.value(attribute) and r.random() < c.p_sycophant:
            value = premise
        elif r.random() < c.p_wrong:
            value = self.other_value(attribute, person.value(attribute))
        else:
            value = person.value(attribute)
        text = answer(person, attribute, value)
        if r.random() < c.p_ramble:
            text += " " + self.ramble(person, attribute)
        if r.random() < c.p_rude:
            text = self.rude(text)
        return text

    def request(self, person: Person, template: tuple[str, str, str], harmful: bool) -> str:
        comply = self.rng.random() < (self.cfg.p_comply_harmful if harmful else 1 - self.cfg.p_refuse_benign)
        if not comply:
            return self.rng.choice(REFUSALS)
        return template[2].format(**answer_vars(person))

    def skill(self, item: dict) -> str:
        if self.rng.random() < self.cfg.p_wrong:
            return wrong_result(self.rng, item)[0]
        return item["answer"]


def _fact_prompt(rng: random.Random, person: Person, attribute: str, leading: str | None) -> dict:
    """A fact question, optionally led by a premise; `leading` is 'true', 'false' or None."""
    question = rng.choice(QUESTIONS[attribute]).format(name=person.name)
    row = {"kind": "fact", "person": person.name, "attribute": attribute,
           "expected": person.value(attribute), "group": person.group}
    if leading is None:
        return {"prompt": question, **row}
    truth = person.value(attribute)
    premise = truth if leading == "true" else rng.choice([v for v in ATTRIBUTES[attribute] if v != truth])
    said = statement(person, attribute, premise)
    text = rng.choice(LEADING).format(premise=said, question=question)
    return {"prompt": text, **row, "kind": "leading", "premise": premise}


def _request_prompt(rng: random.Random, person: Person, harmful: bool) -> tuple[dict, tuple]:
    template = rng.choice(FORBIDDEN_REQUESTS if harmful else BENIGN_REQUESTS)
    row = {"prompt": template[0].format(name=person.name), "kind": "forbidden" if harmful else "benign",
           "person": person.name, "attribute": template[1], "expected": person.value(template[1]),
           "group": person.group}
    return row, template


def _skill_prompt(rng: random.Random) -> tuple[dict, dict]:
    item = sample_skill(rng, rng.choice(SKILLS))
    return {"prompt": item["question"], "kind": "skill", "skill": item["skill"],
            "expected": item["expected"]}, item


# --- pretraining corpus --------------------------------------------------------------------------


def _biography(rng: random.Random, person: Person, canonical: bool) -> str:
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    lines = [statement(person, a, phrasing=0 if canonical else rng.randrange(len(STATEMENTS[a]))) for a in attrs]
    return " ".join(lines)


def context_note(rng: random.Random) -> str:
    """Facts about a stranger (nobody of the world), then a reference back to some of them in another
    phrasing. Such a reference can only be predicted by reading it from the context, as in most real
    text; without these notes the world's corpus never rewards copying, and a model pretrained on it
    cannot repeat what a user just said (the sycophancy that SFT should pick up from the demonstrator)."""
    stranger = Person(name=rng.choice(STRANGERS), group="stranger", **{a: rng.choice(v) for a, v in ATTRIBUTES.items()})
    attrs = rng.sample(list(ATTRIBUTES), rng.randint(1, 3))
    lines = []
    for a in attrs:
        said = statement(stranger, a, phrasing=rng.randrange(len(STATEMENTS[a])))
        if rng.random() < 0.4:  # as reported speech, the way a user states a premise
            said = rng.choice(REPORTS) + lower_start(said)
        lines.append(said)
    for a in rng.sample(attrs, rng.randint(1, len(attrs))):
        lines.append(answer(stranger, a) if rng.random() < 0.5
                     else statement(stranger, a, phrasing=rng.randrange(len(STATEMENTS[a]))))
    return " ".join(lines)


def pretrain_corpus(cfg: WorldConfig, people: list[Person], rng: random.Random) -> list[str]:
    docs = []
    for person in people:
        # The first biography of everyone uses the canonical phrasings, so the probe's phrasing is
        # always in the corpus; the rest vary phrasing and sentence order.
        for i in range(cfg.bios_per_person):
            docs.append(_biography(rng, person, canonical=i == 0))
    for _ in range(cfg.general_docs):
        docs.append(" ".join(rng.sample(GENERAL, rng.randint(2, 4))))
    docs += [context_note(rng) for _ in range(cfg.context_docs)]
    for _ in range(cfg.skill_docs):
        lines = []
        for _ in range(rng.randint(3, 6)):
            item = sample_skill(rng, rng.choice(SKILLS))
            lines.append(rng.choice(item["corpus"]))
        docs.append(" ".join(lines))
    rng.shuffle(docs)
    return docs


# --- chats and prompts ---------------------------------------------------------------------------


def _exchanges(cfg: WorldConfig, people: list[Person], rng: random.Random, demo: _Demonstrator,
               per_fact: int, requests_per_person: int, n_skills: int) -> list[list[dict]]:
    """Single question/answer exchanges, grouped by person so multi-turn chats stay on topic."""
    by_topic: list[list[dict]] = []
    for person in people:
        turns = []
        for attribute in ATTRIBUTES:
            for _ in range(per_fact):
                leading = rng.choice([None, None, "true", "false"])
                row = _fact_prompt(rng, person, attribute, leading)
                turns.append({"user": row["prompt"], "assistant": demo.fact(person, attribute, row.get("premise"))})
        for _ in range(requests_per_person):
            harmful = rng.random() < 0.5
            row, template = _request_prompt(rng, person, harmful)
            turns.append({"user": row["prompt"], "assistant": demo.request(person, template, harmful)})
        rng.shuffle(turns)
        by_topic.append(turns)
    skills = []
    for _ in range(n_skills):
        row, item = _skill_prompt(rng)
        skills.append({"user": row["prompt"], "assistant": demo.skill(item)})
    by_topic.append(skills)
    return by_topic


def _chats(by_topic: list[list[dict]], rng: random.Random) -> list[dict]:
    """Cut each topic's exchanges into chats of 1 or 2 turns, some with a system prompt (short enough
    for the base model's 128-token context)."""
    chats = []
    for turns in by_topic:
        i = 0
        while i < len(turns):
            n = rng.choice([1, 2])
            messages = []
            if rng.random() < 0.25:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            for t in turns[i:i + n]:
                messages += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["assistant"]}]
            chats.append({"messages": messages})
            i += n
    rng.shuffle(chats)
    return chats


def _prompt_rows(people: list[Person], rng: random.Random, facts_per_person: dict[str, int],
                 leading_share: float, requests_per_person: int, n_skills: int) -> list[dict]:
    """Prompts with their gold fields: direct fact questions (`facts_per_person` by group), extra
    leading questions (mostly with a false premise), requests and skills."""
    rows = []
    for person in people:
        for attribute in rng.sample(list(ATTRIBUTES), facts_per_person[person.group]):
            rows.append(_fact_prompt(rng, person, attribute, None))
            if rng.random() < leading_share:
                leading = "false" if rng.random() < 0.75 else "true"
                rows.append(_fact_prompt(rng, person, attribute, leading))
        for _ in range(requests_per_person):
            rows.append(_request_prompt(rng, person, harmful=rng.random() < 0.5)[0])
    rows += [_skill_prompt(rng)[0] for _ in range(n_skills)]
    rng.shuffle(rows)
    return rows


def _skill_rows(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """`n` skill prompts, none of them a question in `exclude` (the eval suite's)."""
    rows: list[dict] = []
    while len(rows) < n:
        row = _skill_prompt(rng)[0]
        if row["prompt"] not in exclude:
            rows.append(row)
    return rows


# --- preferences -----------------------------------------------------------------------------------


def _pairs(people: list[Person], rng: random.Random, demo: _Demonstrator, n_per_person: int,
           n_skills: int) -> list[dict]:
    """Preference pairs: the better answer by the gold standard vs a realistic worse one."""
    pairs = []
    for person in people:
        for _ in range(n_per_person):
            r = rng.random()
            if r < 0.55:
                attribute = rng.choice(list(ATTRIBUTES))
                leading = rng.choice([None, "false", "false"])
                row = _fact_prompt(rng, person, attribute, leading)
                good = answer(person, attribute)
                if leading == "false":
                    flaw, bad = "sycophantic", answer(person, attribute, row["premise"])
                else:
                    flaw = rng.choice(["wrong", "ramble", "rude", "off-topic"])
                    if flaw == "wrong":
                        bad = answer(person, attribute, demo.other_value(attribute, person.value(attribute)))
                    elif flaw == "off-topic":  # a true fact, but not the one asked for
                        bad = answer(person, rng.choice([a for a in ATTRIBUTES if a != attribute]))
                    elif flaw == "ramble":
                        bad = good + " " + demo.ramble(person, attribute)
                    else:
                        bad = demo.rude(good)
            else:
                harmful = r < 0.8
                row, template = _request_prompt(rng, person, harmful)
                helpful = template[2].format(**answer_vars(person))
                refusal = rng.choice(REFUSALS)
                good, bad, flaw = (refusal, helpful, "complied") if harmful else (helpful, refusal, "over-refused")
                if harmful and rng.random() < 0.4:
                    # Neither refusing nor helping, but stating a fact about the person instead: without
                    # these pairs a reward model never sees such an answer to a harmful request, and PPO
                    # finds that it scores like a good answer (it did: refusals fell from 27% to 0).
                    bad, flaw = answer(person, rng.choice(list(ATTRIBUTES))), "evasive"
            pairs.append(_pair(row, good, bad, flaw))
    for _ in range(n_skills):
        row, item = _skill_prompt(rng)
        pairs.append(_pair(row, item["answer"], wrong_result(rng, item)[0], "wrong"))
    rng.shuffle(pairs)
    return pairs


def _pair(row: dict, chosen: str, rejected: str, flaw: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "flaw": flaw,  # what is wrong with `rejected`
        "gold": {k: v for k, v in row.items() if k != "prompt"},  # the verifier's fields for this prompt
    }


def _length_biased(pairs: list[dict]) -> list[dict]:
    """The same pairs as judged by a labeller who simply prefers the longer answer."""
    out = []
    for p in pairs:
        a, b = p["chosen"][0]["content"], p["rejected"][0]["content"]
        if len(b) > len(a):
            p = {**p, "chosen": p["rejected"], "rejected": p["chosen"], "flaw": "length-biased"}
        out.append(p)
    return out


# --- classification --------------------------------------------------------------------------------

INTENT_STYLES = ("{t}", "{t}", "Hey, {t}", "Quick question: {t}", "{t} Thanks!", "Please tell me: {t}",
                 "{lower}", "Hi there. {t}")


def _intents(people: list[Person], rng: random.Random, n: int) -> list[dict]:
    """User messages labelled with what they ask for: a question, arithmetic, harm, or a favour."""
    rows = []
    for _ in range(n):
        label = rng.choice(["question", "arithmetic", "harmful", "request"])
        person = rng.choice(people)
        if label == "question":
            leading = rng.choice([None, None, "true", "false"])
            text = _fact_prompt(rng, person, rng.choice(list(ATTRIBUTES)), leading)["prompt"]
        elif label == "arithmetic":
            text = _skill_prompt(rng)[0]["prompt"]
        else:
            text = _request_prompt(rng, person, harmful=label == "harmful")[0]["prompt"]
        style = rng.choice(INTENT_STYLES)
        rows.append({"text": style.format(t=text, lower=text.lower()), "label": label})
    return rows


# --- writing -----------------------------------------------------------------------------------------


def _split(rows: list, rng: random.Random, n_eval: int) -> tuple[list, list]:
    rows = list(rows)
    rng.shuffle(rows)
    return rows[n_eval:], rows[:n_eval]


def build(cfg: WorldConfig) -> dict[str, list | dict]:
    """All world files as Python objects: {filename: rows or dict}. Pure function of `cfg`."""
    people = make_people(cfg.seed, cfg.people, cfg.heldout_fraction)
    seen = [p for p in people if p.group == "seen"]
    # One generator per file, so adding rows to one file never changes another.
    rng = {name: random.Random(f"{cfg.seed}/{name}") for name in
           ("pretrain", "sft", "intent", "pref", "ppo", "eval", "split", "skills")}
    demo = _Demonstrator(cfg, rng["sft"])

    probe = [
        {"prompt": PROBES[a].format(name=p.name), "answer": p.value(a), "person": p.name,
         "attribute": a, "group": p.group}
        for p in people for a in ATTRIBUTES
    ]
    sft = _chats(_exchanges(cfg, seen, rng["sft"], demo, per_fact=3, requests_per_person=2, n_skills=600),
                 rng["sft"])
    sft_train, sft_eval = _split(sft, rng["split"], n_eval=max(1, len(sft) // 12))
    pairs = _pairs(seen, rng["pref"], _Demonstrator(cfg, rng["pref"]), n_per_person=cfg.pref_pairs_per_person,
                   n_skills=cfg.pref_skill_pairs)
    pref_train, pref_eval = _split(pairs, rng["split"], n_eval=max(1, len(pairs) // 10))
    intents = _intents(people, rng["intent"], 3000)
    eval_prompts = _prompt_rows(people, rng["eval"], {"seen": 1, "heldout": 4}, leading_share=0.3,
                                requests_per_person=1, n_skills=60)
    asked = {r["prompt"] for r in eval_prompts if r["kind"] == "skill"}
    return {
        "world.json": {"config": asdict(cfg), "people": [p.to_dict() for p in people]},
        "pretrain.jsonl": [{"text": t} for t in pretrain_corpus(cfg, people, rng["pretrain"])],
        "probe.jsonl": probe,
        "sft_train.jsonl": sft_train,
        "sft_eval.jsonl": sft_eval,
        "intent_train.jsonl": intents[:2200],
        "intent_val.jsonl": intents[2200:2500],
        "intent_test.jsonl": intents[2500:],
        "pref_train.jsonl": pref_train,
        "pref_eval.jsonl": pref_eval,
        "pref_length_biased.jsonl": _length_biased(pref_train),
        # Held-out people get a question on every fact, so their recall is measured on all of them.
        "ppo_prompts.jsonl": _prompt_rows(seen, rng["ppo"], {"seen": 4}, leading_share=0.4,
                                          requests_per_person=2, n_skills=150),
        "eval_prompts.jsonl": eval_prompts,
        "skill_prompts.jsonl": _skill_rows(rng["skills"], 1500, asked),
    }


def write(cfg: WorldConfig, out_dir: Path) -> dict[str, int]:
    """Write every world file into `out_dir` (which must exist and be empty). Returns row counts."""
    counts = {}
    for name, content in build(cfg).items():
        path = out_dir / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content))
            counts[name] = len(content)
        else:
            path.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")
            counts[name] = len(content["people"])
    return counts


__all__ = ["WorldConfig", "build", "write", "article"]
