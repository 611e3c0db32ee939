"""A synthetic corpus with planted facts, and queries whose sources are known.

Each invented country has a capital and a river. Every fact ("the capital of
zorbia is vintar") is stated by exactly two documents (its *sources*): one in
the words the query uses, one paraphrased, each mixed with filler sentences; the rest of the corpus is
filler built from the same vocabulary. A query asks for a fact (prompt "the
capital of zorbia is", completion "vintar"); a good attribution ranks the
fact's sources at the top.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = ["zor", "bia", "vin", "tar", "kel", "mos", "dra", "pel", "qua", "rin", "sul", "tem", "vor", "lix", "nam",
             "bro", "cet", "dun", "fay", "gor"]
FILLER = [
    "the weather was mild and the roads were quiet .",
    "many people walk to the market in the morning .",
    "a small boat crossed the lake before noon .",
    "the old library keeps maps of every province .",
    "farmers grow wheat and barley on the hills .",
    "children play near the square after school .",
    "the train leaves the station at dawn .",
    "merchants sell bread , cloth and salt .",
    "the museum shows paintings from many ages .",
    "a bridge of stone spans the valley .",
]
TEMPLATES = {
    "capital": ["the capital of {c} is {v} .", "{v} is the capital of {c} .",
                "people of {c} call {v} their capital ."],
    "river": ["the river of {c} is the {v} .", "the {v} is the river that crosses {c} .",
              "in {c} the great river is the {v} ."],
}
QUERY_PROMPTS = {"capital": "the capital of {c} is", "river": "the river of {c} is the"}


@dataclass(frozen=True)
class Fact:
    country: str
    relation: str
    value: str

    @property
    def key(self) -> str:
        return f"{self.relation}-{self.country}"


def unique_name(rng: random.Random, used: set[str], syllables: list[str] = SYLLABLES) -> str:
    """A made-up name of two distinct syllables that is not in ``used`` (added to it)."""
    while True:
        name = "".join(rng.sample(syllables, 2))
        if name not in used:
            used.add(name)
            return name


def make_corpus(countries: int = 16, filler_docs: int = 200, seed: int = 0):
    """(documents [{id, text, source_of}], facts). ``source_of`` names the fact a document states, or ''."""
    rng = random.Random(seed)
    used: set[str] = set()
    facts = []
    for _ in range(countries):
        c = unique_name(rng, used)
        facts += [Fact(c, "capital", unique_name(rng, used)), Fact(c, "river", unique_name(rng, used))]
    docs = []
    for fact in facts:
        phrasings = [TEMPLATES[fact.relation][0], rng.choice(TEMPLATES[fact.relation][1:])]
        for j, template in enumerate(phrasings):
            # the fact opens the document: a GPT-2 learns positions too, and the query starts at 0
            sentences = [template.format(c=fact.country, v=fact.value)] + rng.sample(FILLER, 2)
            docs.append({"id": f"fact-{fact.key}-{j}", "text": " ".join(sentences), "source_of": fact.key})
    countries_seen = [f.country for f in facts]
    for i in range(filler_docs):
        sentences = rng.sample(FILLER, 3)
        if rng.random() < 0.5:  # mentions a country without stating a fact
            sentences.append(f"travellers often visit {rng.choice(countries_seen)} in summer .")
        rng.shuffle(sentences)
        docs.append({"id": f"filler-{i}", "text": " ".join(sentences), "source_of": ""})
    rng.shuffle(docs)
    return docs, facts


def make_queries(facts: list[Fact], n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 1)
    chosen = rng.sample(facts, n)
    return [{"query_id": f.key, "prompt": QUERY_PROMPTS[f.relation].format(c=f.country), "completion": f.value}
            for f in chosen]
