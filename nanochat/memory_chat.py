"""Conversations that need a memory: the user mentions a few personal facts, the chat moves on for many
turns, and then the user asks for one of them ("my locker number is 4821" ... "What is my locker number?").

A conversation is: an optional greeting; the user's facts, each in its own turn and acknowledged without
repeating the value (so the answer occurs exactly once before the question); then filler turns until about
`words` words have passed (the user shares passages of a book corpus, or synthetic paragraphs, and asks about
the assistant; the assistant answers briefly); then the question, answered with one sentence that holds
the value verbatim ("Your locker number is 4821."). The facts are of different kinds, so only the asked
one answers the question; the asked fact is any of them. The number of filler words is uniform in
[0, words], so the distance between fact and question varies from adjacent to a whole context.

With MegaContext the same conversation can run far past the model's context (chat_cli --mc): the fact
then lies in a block that LensNet has to expand when the question comes. Example i depends only on
(seed, split, i).
"""

import random

from nanochat.longdoc_qa import PLACE_HEADS, PLACE_TAILS, SYLLABLES, synthetic_paragraph

# (value kind, statement, question, answer): {v} is the value; one fact per kind and template
MEMORY_FACTS = [
    ("number", "my locker number is {v}", "What is my locker number?", "Your locker number is {v}."),
    ("number", "the code of my front door is {v}", "What is the code of my front door?", "The code of your front door is {v}."),
    ("number", "my flight number is {v}", "What is my flight number?", "Your flight number is {v}."),
    ("place", "I grew up in {v}", "Where did I grow up?", "You grew up in {v}."),
    ("place", "my sister lives in {v}", "Where does my sister live?", "Your sister lives in {v}."),
    ("word", "my cat is called {v}", "What is my cat called?", "Your cat is called {v}."),
    ("word", "my boat is named {v}", "What is my boat named?", "Your boat is named {v}."),
]
STATEMENT_FORMS = ["By the way, {s}.", "Please remember this: {s}.", "{S}.", "Just so you know, {s}.", "Note that {s}."]
ACKNOWLEDGEMENTS = ["Got it, I will remember that.", "Noted.", "Okay, I'll keep that in mind.", "Thanks, I have noted it."]
SHARE_FORMS = ["Here is a passage I was reading:\n\n{p}", "What do you think of this text?\n\n{p}", "{p}",
               "Let me share a paragraph with you:\n\n{p}"]
SHARE_REPLIES = ["Thank you for sharing that passage.", "That is an interesting text.", "I see. What else would you like to talk about?",
                 "Thanks! It reads well."]
SMALL_TALK = [("How are you today?", "I'm doing well, thank you. How can I help?"),
              ("Can you keep a secret?", "I keep what you tell me in our conversation, and I can recall it later."),
              ("Do you like books?", "I like reading the passages you share with me."),
              ("What time is it?", "I don't have a clock, so I cannot tell the time.")]


def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1000, 99999))
    if kind == "place":
        return rng.choice(PLACE_HEADS) + rng.choice(PLACE_TAILS)
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def memory_example(rng: random.Random, words: int, filler=None, n_facts: int = 3, min_words: int = 0) -> dict:
    """One conversation: facts, about uniform[min_words, words] words of filler turns, the question and its answer."""
    facts = rng.sample(MEMORY_FACTS, n_facts)
    values = []
    while len(values) < n_facts:
        v = _value(facts[len(values)][0], rng)
        if v not in values:
            values.append(v)
    asked = rng.randrange(n_facts)
    messages = []
    for (_, statement, _, _), v in zip(facts, values):
        s = statement.format(v=v)
        messages += [{"role": "user", "content": rng.choice(STATEMENT_FORMS).format(s=s, S=s[0].upper() + s[1:])},
                     {"role": "assistant", "content": rng.choice(ACKNOWLEDGEMENTS)}]
    budget, start = rng.randint(min_words, words), rng.randrange(len(filler)) if filler else 0
    shared, i = 0, 0
    while shared < budget:
        if rng.random() < 0.2:
            question, reply = rng.choice(SMALL_TALK)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
            shared += len(question.split()) + len(reply.split())
            continue
        paragraph = filler[(start + i) % len(filler)] if filler else synthetic_paragraph(rng)
        i += 1
        paragraph = " ".join(paragraph.split()[:budget - shared])
        if any(v in paragraph for v in values):
            continue  # a passage holding a value would be a second answer
        messages += [{"role": "user", "content": rng.choice(SHARE_FORMS).format(p=paragraph)},
                     {"role": "assistant", "content": rng.choice(SHARE_REPLIES)}]
        shared += len(paragraph.split())
    _, _, question, answer = facts[asked]
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer.format(v=values[asked])}]
    meta = {"source": "memory", "answer": values[asked], "kind": facts[asked][0], "question": question, "filler_words": shared,
            "values": values, "asked": asked}
    return {"messages": messages, "meta": meta}


def memory_chats(n: int, words: int, filler=None, split: str = "train", seed: int = 0, min_words: int = 0) -> list[dict]:
    """n memory conversations; example i depends only on (seed, split, i). filler: paragraphs (book_paragraphs);
    min_words = words: every conversation has that many filler words (an evaluation at a fixed distance)."""
    return [memory_example(random.Random(f"memory/{split}/{seed}/{i}"), words, filler, min_words=min_words)
            for i in range(n)]
