"""The planted-fact corpus of ``influence eval facts``: people, the town they live in, the job they do.

Every fact ("kelmos lives in vintar", "kelmos works as a baker") is stated by
``sources`` documents, each in a different phrasing drawn from the corpus
templates (one of them always the phrasing the corpus-phrased query uses), each
mixed with filler sentences at a random position. The rest of the corpus is
distractors: filler sentences that mention people, towns and jobs without
stating a fact. Towns and jobs are shared by several people, so a completion
word alone does not identify its sources.

Two queries per fact, with the completion being the fact's value:

- ``corpus``: the prompt of template 0 ("kelmos lives in" -> "vintar"), a
  phrasing some source uses word for word;
- ``paraphrase``: a phrasing no document uses ("the town where kelmos lives is"
  -> "vintar"), made only of words the corpus contains.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..demo.corpus import unique_name

SYLLABLES = ["zor", "bia", "vin", "tar", "kel", "mos", "dra", "pel", "qua", "rin", "sul", "tem", "vor", "lix", "nam",
             "bro", "cet", "dun", "fay", "gor", "hal", "jun", "lop", "mir"]
JOBS = ["baker", "doctor", "farmer", "teacher", "painter", "sailor", "tailor", "miner", "potter", "weaver",
        "singer", "builder", "carpenter", "fisher", "hunter", "poet"]
# {p} person, {v} value; template 0 is the corpus-phrased query's phrasing (its prompt is everything before {v})
TEMPLATES = {
    "town": ["{p} lives in {v} .", "the home of {p} is in {v} .", "{p} has a house in {v} .",
             "in {v} , {p} has a small house ."],
    "job": ["{p} works as a {v} .", "{p} is a {v} by trade .", "everyone knows {p} as a skilled {v} .",
            "as a {v} , {p} works long hours ."],
}
PARAPHRASES = {"town": "the town where {p} lives is", "job": "for a living , {p} is a"}
FILLER = [
    "the weather was mild and the roads were quiet .",
    "many people walk to the market in the morning .",
    "a small boat crossed the lake before noon .",
    "the old library keeps maps of every town .",
    "farmers grow wheat and barley on the hills .",
    "children play near the square after school .",
    "the train leaves the station at dawn .",
    "merchants sell bread , cloth and salt for a living .",
    "the museum shows paintings from many ages .",
    "a bridge of stone spans the valley .",
    "the town where the river bends is known for its fish .",
    "a good house needs a strong roof .",
    "the festival is held every year in spring .",
    "long hours of rain flooded the lower fields .",
]
MENTIONS = {  # a distractor sentence naming a person, a town or a job without stating a fact
    "person": ["{x} went to the market on monday .", "{x} likes long walks by the lake .",
               "a letter from {x} arrived late ."],
    "town": ["the streets of {x} are busy in winter .", "a road leads from the hills to {x} ."],
    "job": ["a {x} often starts work early .", "the work of a {x} is never done ."],
}


@dataclass(frozen=True)
class Fact:
    person: str
    relation: str  # town | job
    value: str

    @property
    def key(self) -> str:
        return f"{self.relation}-{self.person}"


def make_facts_corpus(people: int = 32, towns: int = 12, jobs: int = 12, sources: int = 3,
                      distractors: int = 288, seed: int = 0) -> tuple[list[dict], list[Fact], list[dict]]:
    """(documents [{id, text, source_of}], facts, queries [{query_id, prompt, completion, set, fact}]).

    ``source_of`` is the key of the fact a document states, or ''. ``sources``
    documents per fact (2 to 4, each a different template; template 0 always
    among them).
    """
    if not 2 <= sources <= len(TEMPLATES["town"]):
        raise ValueError(f"sources must be 2 to {len(TEMPLATES['town'])}, got {sources}")
    rng = random.Random(seed)
    used: set[str] = set()
    town_names = [unique_name(rng, used, SYLLABLES) for _ in range(towns)]
    job_names = JOBS[:jobs]
    persons = [unique_name(rng, used, SYLLABLES) for _ in range(people)]
    facts = [Fact(p, rel, rng.choice(town_names if rel == "town" else job_names))
             for p in persons for rel in ("town", "job")]
    docs = []
    for fact in facts:
        phrasings = [0] + rng.sample(range(1, len(TEMPLATES[fact.relation])), sources - 1)
        for j, t in enumerate(phrasings):
            # the fact opens the document: a GPT-2 learns positions too, and a query starts at position 0
            sentences = [TEMPLATES[fact.relation][t].format(p=fact.person, v=fact.value)] + rng.sample(FILLER, 2)
            docs.append({"id": f"fact-{fact.key}-{j}", "text": " ".join(sentences), "source_of": fact.key})
    pools = {"person": persons, "town": town_names, "job": job_names}
    for i in range(distractors):
        sentences = rng.sample(FILLER, 2)
        for kind in rng.sample(list(MENTIONS), 2):
            sentences.append(rng.choice(MENTIONS[kind]).format(x=rng.choice(pools[kind])))
        rng.shuffle(sentences)
        docs.append({"id": f"other-{i}", "text": " ".join(sentences), "source_of": ""})
    rng.shuffle(docs)
    queries = []
    for f in facts:
        corpus_prompt = TEMPLATES[f.relation][0].split("{v}")[0].strip().format(p=f.person)
        queries.append({"query_id": f.key, "prompt": corpus_prompt, "completion": f.value, "set": "corpus",
                        "fact": f.key})
        queries.append({"query_id": f"{f.key}.para", "prompt": PARAPHRASES[f.relation].format(p=f.person),
                        "completion": f.value, "set": "paraphrase", "fact": f.key})
    return docs, facts, queries
