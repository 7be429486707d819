"""Question answering over long generated documents: the task that makes a model use its far context.

A document of about `doc_words` words is filler text (paragraphs of a book corpus passed in as
`filler`, see `book_paragraphs`; bland synthetic sentences when none is given) with made-up facts
planted as their own paragraphs at uniformly random depths, e.g. "The secret code of the silver
falcon is 4817." or "Captain Mira Holt was born in Velmere." Entities and values come from word
lists and random draws, so an answer cannot be guessed without reading the document. Of the facts,
one is asked about; `n_facts - 1` others concern unrelated entities, and `n_distractors` are near
misses of the asked one: the same attribute of a one-word-different entity (silver heron, Doctor
Mira Holt) or another attribute of the same entity. Guarantees: values are unique per document and
the answer occurs exactly once in the user turn (a draw whose filler happens to hold it is redone).

A conversation is one user turn (document, blank line, question) and one short assistant turn that
contains the answer verbatim. Its "meta" holds the answer, the fact, the fact's char offset in the
document and its depth (offset / document length), the distractor facts and values, and the word
count. Example i depends only on (seed, split, i); `longdoc_qa_eval` is the "val" seed stream, held
out from "train".
"""

import random
from dataclasses import dataclass

from nanochat.dataset import iter_documents


@dataclass
class LongDocQAConfig:
    doc_words: int = 3000  # approximate document length in words (~1.3 tokens/word at a 32k vocab, more when smaller)
    n_facts: int = 8  # facts about unrelated entities; one of them is asked about
    n_distractors: int = 8  # near misses of the asked fact: its attribute for a similar entity, or its entity's other attributes
    seed: int = 0

    def __post_init__(self):
        if not (1 <= self.n_facts <= 100 and 0 <= self.n_distractors <= 30 and self.doc_words >= 1):
            raise ValueError(f"LongDocQAConfig needs 1 <= n_facts <= 100, 0 <= n_distractors <= 30 "
                             f"(near misses of one entity run out) and doc_words >= 1, got {self}")


ADJECTIVES = "silver amber crimson ivory cobalt copper jade scarlet obsidian golden violet emerald ashen bronze onyx saffron".split()
CREATURES = "falcon heron lynx otter stag raven viper badger crane wolf marten osprey beetle moth salamander tortoise".split()
TITLES = "Captain Doctor Professor Admiral Inspector Judge Colonel Sister".split()
FIRST_NAMES = "Mira Tobias Ilse Ravi Oona Henrik Lucia Emeka Sanne Dmitri Aiko Bruno Ysolde Kasimir Noor Teodor".split()
LAST_NAMES = "Holt Varga Lindqvist Okafor Brandt Marlowe Castellan Ferreira Nakamura Quist Rourke Sato Vance Whitlock Zeller Abernathy".split()
PLACE_HEADS = "Vel Kor Ash Brim Dun Fen Gal Hal Istr Jor Lun Mar Nor Ost Quar Rav Sel Thor Ulm Vard Wen Yr Zan Kest".split()
PLACE_TAILS = "mere holm stad wick gard haven ford moor dale port vik burg lund crest".split()
SYLLABLES = "ka lo mi ren tu vo za shi bel dor gan pi qua sel tor wyn".split()  # made-up words: 3 syllables, capitalised
# (entity kind, value kind, fact, question): the fact is also a short answer that holds the value verbatim
FACT_KINDS = [
    ("thing", "code", "The secret code of the {e} is {v}.", "what is the secret code of the {e}?"),
    ("thing", "place", "The {e} is hidden in the town of {v}.", "in which town is the {e} hidden?"),
    ("thing", "word", "The keeper of the {e} is named {v}.", "what is the name of the keeper of the {e}?"),
    ("person", "place", "{e} was born in {v}.", "where was {e} born?"),
    ("person", "code", "The locker number of {e} is {v}.", "what is the locker number of {e}?"),
    ("person", "word", "{e} named the boat {v}.", "what did {e} name the boat?"),
]
QUESTION_FORMS = ["Based on the document above, {q}", "According to the text above, {q}", "Question: {Q}",
                  "{Q} Answer using the document above.", "Using only the document above: {q}"]
ANSWER_FORMS = ["{v}", "{v}.", "{fact}", "According to the document, {fact_lc}"]

# bland sentences for documents when no book text is given: no digits, no capitalised names
FILLER_SUBJECTS = ("the old road|the morning light|a quiet village|the river|the market square|the north field|a narrow lane|"
                   "the harbour|the garden wall|the evening wind|the baker|a tired traveller|the schoolteacher|the little church|"
                   "an old farmer|the stone bridge|the clock tower|a grey cat").split("|")
FILLER_VERBS = ("ran along|looked over|stood near|turned toward|rested beside|faded behind|waited by|leaned against|passed under|"
                "wandered past|stayed close to|shone upon").split("|")
FILLER_ENDINGS = ("in the autumn|for most of the day|as it always had|without any hurry|after the rain|before the bells rang|"
                  "while the kettle boiled|until the light was gone|on most mornings|as the neighbours said it would|"
                  "during the long winter|with the usual calm").split("|")


def synthetic_paragraph(rng: random.Random) -> str:
    """3-7 bland, unrelated sentences (~12 words each) that carry no facts worth remembering."""
    sentences = []
    for _ in range(rng.randint(3, 7)):
        subject, thing = rng.sample(FILLER_SUBJECTS, 2)
        s = f"{subject} {rng.choice(FILLER_VERBS)} {thing} {rng.choice(FILLER_ENDINGS)}."
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences)


def book_paragraphs(data_dir, split: str = "train", min_words: int = 8) -> list[str]:
    """Paragraphs (blank-line separated, whitespace collapsed) of a prepared pretraining corpus, e.g.
    `book_paragraphs(dataset.prepare("books"), split)`: natural filler for longdoc_qa."""
    paragraphs = []
    for doc in iter_documents(data_dir, split):
        for block in doc.split("\n\n"):
            words = block.split()
            if len(words) >= min_words:
                paragraphs.append(" ".join(words))
    return paragraphs


def _entity(kind: str, rng: random.Random) -> str:
    if kind == "thing":
        return f"{rng.choice(ADJECTIVES)} {rng.choice(CREATURES)}"
    return f"{rng.choice(TITLES)} {rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _near_miss(entity: str, rng: random.Random) -> str:
    """A different entity sharing all but one word with `entity` (e.g. silver falcon -> silver heron)."""
    words = entity.split()
    i = rng.randrange(len(words))
    pools = [ADJECTIVES, CREATURES] if len(words) == 2 else [TITLES, FIRST_NAMES, LAST_NAMES]
    words[i] = rng.choice([w for w in pools[i] if w != words[i]])
    return " ".join(words)


def _value(kind: str, rng: random.Random) -> str:
    if kind == "code":
        return str(rng.randint(1000, 9999))
    if kind == "place":
        return rng.choice(PLACE_HEADS) + rng.choice(PLACE_TAILS)
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def _plant_facts(cfg: LongDocQAConfig, rng: random.Random) -> list[tuple[int, str, str]]:
    """(fact kind index, entity, value) for the asked fact, the other facts, then the distractors:
    every (kind, entity) pair and every value used once."""
    asked_kind = rng.randrange(len(FACT_KINDS))
    asked_entity = _entity(FACT_KINDS[asked_kind][0], rng)
    same_entity = [k for k, kind in enumerate(FACT_KINDS) if kind[0] == FACT_KINDS[asked_kind][0] and k != asked_kind]
    distractors = []  # drawn first: near misses are few (30 + 2), the other facts have thousands of choices
    while len(distractors) < cfg.n_distractors:
        if same_entity and rng.random() < 0.25:
            pair = (same_entity.pop(rng.randrange(len(same_entity))), asked_entity)
        else:
            pair = (asked_kind, _near_miss(asked_entity, rng))
        if pair not in distractors:
            distractors.append(pair)
    others = []
    while len(others) < cfg.n_facts - 1:
        k = rng.randrange(len(FACT_KINDS))
        pair = (k, _entity(FACT_KINDS[k][0], rng))
        if pair[1] != asked_entity and pair not in others and pair not in distractors:
            others.append(pair)
    facts, values = [], set()
    for k, entity in [(asked_kind, asked_entity)] + others + distractors:
        value = _value(FACT_KINDS[k][1], rng)
        while value in values:  # values are unique per document
            value = _value(FACT_KINDS[k][1], rng)
        values.add(value)
        facts.append((k, entity, value))
    return facts


def _filler(rng: random.Random, filler, n_words: int) -> list[str]:
    """About n_words of paragraphs: a contiguous run of `filler` from a random start, else synthetic ones."""
    paragraphs, count = [], 0
    start = rng.randrange(len(filler)) if filler else 0
    while count < n_words:
        p = filler[(start + len(paragraphs)) % len(filler)] if filler else synthetic_paragraph(rng)
        words = p.split()
        if count + len(words) > n_words:  # cut the last paragraph so the length lands on target
            p = " ".join(words[:n_words - count])
        paragraphs.append(p)
        count += len(words)
    return paragraphs


def longdoc_qa_example(cfg: LongDocQAConfig, rng: random.Random, filler=None) -> dict:
    """One document-then-question conversation; meta has the answer and where its fact sits."""
    for _ in range(100):  # the answer must occur exactly once; redraw in the rare case filler text holds it
        facts = _plant_facts(cfg, rng)
        sentences = [FACT_KINDS[k][2].format(e=e, v=v) for k, e, v in facts]
        paragraphs = _filler(rng, filler, max(1, cfg.doc_words - sum(len(s.split()) for s in sentences)))
        slots = [rng.randint(0, len(paragraphs)) for _ in facts]  # fact i goes before paragraph slots[i]
        order = sorted(range(len(facts)), key=lambda i: (slots[i], rng.random()))
        parts, p, fact_offset = [], 0, 0
        for i in order:
            parts += paragraphs[p:slots[i]]
            p = slots[i]
            if i == 0:  # the asked fact: its offset in "\n\n".join(parts)
                fact_offset = sum(len(x) + 2 for x in parts)
            parts.append(sentences[i])
        parts += paragraphs[p:]
        document = "\n\n".join(parts)
        k, entity, answer = facts[0]
        q = FACT_KINDS[k][3].format(e=entity)
        question = rng.choice(QUESTION_FORMS).format(q=q, Q=q[0].upper() + q[1:])
        user = f"{document}\n\n{question}"
        if user.count(answer) == 1:
            break
    else:
        raise ValueError(f"longdoc_qa: the filler text keeps containing the planted answers (last: {answer!r})")
    fact = sentences[0]
    fact_lc = fact[0].lower() + fact[1:] if fact.startswith("The ") else fact
    reply = rng.choice(ANSWER_FORMS).format(v=answer, fact=fact, fact_lc=fact_lc)
    meta = {"source": "longdoc_qa", "answer": answer, "question": question, "fact": fact,
            "fact_offset": fact_offset, "depth": fact_offset / len(document),
            "distractor_facts": sentences[cfg.n_facts:], "distractor_values": [v for _, _, v in facts[cfg.n_facts:]],
            "doc_words": len(document.split())}
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], "meta": meta}


def longdoc_qa(n: int, cfg: LongDocQAConfig | None = None, filler=None, split: str = "train") -> list[dict]:
    """n longdoc_qa conversations; example i depends only on (cfg, split, i). filler: list of paragraphs."""
    cfg = cfg or LongDocQAConfig()
    return [longdoc_qa_example(cfg, random.Random(f"longdoc_qa/{split}/{cfg.seed}/{i}"), filler) for i in range(n)]


def longdoc_qa_eval(n: int, cfg: LongDocQAConfig | None = None, filler=None) -> list[dict]:
    """The held-out longdoc_qa set for chat_eval (the "val" seed stream; give val-split filler too)."""
    return longdoc_qa(n, cfg, filler, split="val")
