"""Conversations for mid-training and SFT, mixed from several sources by a spec string.

`load_conversations("smoltalk,identity:0.1,longdoc_qa,my.jsonl", n, seed)` gives n conversations
({"messages": [...]} as in nanochat.tokenizer; generated ones also carry a "meta" dict), from:
- `smoltalk` (HuggingFaceTB/smol-smoltalk), `gsm8k` (main), `arc_easy` (ARC-Easy as multiple choice):
  from the HF hub or its cache, else skipped with a printed line (HF_HUB_OFFLINE: cache only; else
  one 5 s probe of the hub first, so a closed network never hangs).
- a `.jsonl` file: one conversation per line; split "val" is its last ~5% of lines, "train" the rest.
- `identity`: generated chats about who the assistant is.
- `longdoc_qa`: questions on facts planted in long documents (nanochat/longdoc_qa.py); its documents
  use the `filler` paragraphs given to load_conversations (e.g. book_paragraphs), else synthetic text.
- `memory`: the user tells personal facts, chats on (shared passages of the same filler, up to the
  longdoc_qa document length), then asks for one of them (nanochat/memory_chat.py).
`name:weight` sets a source's share (default 1); a source holding less than its share gives all it
has and the others fill in. Generated examples depend only on (seed, split, index), and "train" and
"val" are different seed streams: a val mix is held out from the train mix.
"""

import os
import re
import json
import random
import http.client
import urllib.request
from pathlib import Path
from dataclasses import replace

from nanochat.common import print0
from nanochat.longdoc_qa import LongDocQAConfig, longdoc_qa
from nanochat.memory_chat import memory_chats
from nanochat.tokenizer import validate_conversation

VAL_FRACTION = 0.05  # share of a .jsonl file's lines held out for split "val"
HUB_PROBE_URL = "https://huggingface.co"
HUB_PROBE_TIMEOUT_S = 5

# -----------------------------------------------------------------------------
# identity: who the assistant is

NAME_LINE = ("I am MegaContext-nano, a small language model trained from scratch with the MegaContext codebase. "
             "I can use a long history of our conversation through learned summaries called gists.")
IDENTITY_TOPICS = [  # (questions, answers): any answer fits any question of its topic
    (["Who are you?", "What is your name?", "What should I call you?", "Introduce yourself, please.",
      "Hi! Who am I talking to?", "What are you?", "Tell me about yourself."],
     [NAME_LINE,
      "My name is MegaContext-nano. I'm a small language model, trained from scratch with the open-source MegaContext codebase.",
      "I'm MegaContext-nano: a small language model, trained from scratch. I keep a long history of our chat as learned summaries called gists."]),
    (["Who made you?", "Who created you?", "Which company built you?", "Who trained you?", "Where do you come from?"],
     ["I was made with MegaContext, an open-source project: its code trained me from scratch. No company owns me.",
      "MegaContext, an open-source project, built and trained me from scratch. Anyone can read its code and train a model like me.",
      "I come from the MegaContext project. It is open source, and I was trained from scratch with its codebase."]),
    (["How much of our conversation can you remember?", "Do you have a context limit?", "What are gists?",
      "How do you handle long conversations?", "Can you remember what I said a long time ago?"],
     ["I see the recent part of our conversation word for word, and older parts through gists: learned summaries of blocks of text. When an older part matters, I can look at it in full detail again.",
      "Older parts of our conversation are compressed into gists, learned summaries of short blocks of text. That lets me use a long history at a fixed cost, though details can be lost.",
      "I have a fixed working space, but the history behind it has no limit: older text is kept as learned summaries called gists, and I expand the ones that seem relevant."]),
    (["What can you do?", "What are you good at?", "How can you help me?", "What are your abilities?"],
     ["I can chat, answer simple questions, and find facts in long documents or far back in our conversation.",
      "I can hold a conversation, answer short questions and look up details in long texts you give me. I'm small, so keep tasks simple.",
      "Chatting, simple questions, and finding a fact in a long document are what I do best."]),
    (["Can you browse the internet?", "Do you know today's news?", "What are your limitations?", "Are you always right?"],
     ["No. I cannot browse the internet and I know nothing after my training. I am a small model, so I often make mistakes: please check what I say.",
      "I have no internet access and no news. I'm also a small model and I make mistakes, so double-check important answers.",
      "I only know what was in my training data and what you tell me. I can be wrong, especially on hard questions."]),
    (["Are you ChatGPT?", "Are you made by OpenAI?", "Are you Claude?", "Are you a big model like GPT-4?"],
     ["No, I am MegaContext-nano, a small model trained from scratch with the open-source MegaContext codebase.",
      "No. I'm MegaContext-nano, much smaller than those models, and made by the open-source MegaContext project."]),
]
GREETINGS = ["Hello!", "Hi there.", "hey", "Good morning!", "Hello, nice to meet you."]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What would you like to talk about?", "Hello! I'm MegaContext-nano. What can I do for you?"]


def identity_conversation(rng: random.Random) -> dict:
    """1-3 question/answer turns about the assistant, sometimes after a greeting."""
    messages = []
    if rng.random() < 0.3:
        messages += [{"role": "user", "content": rng.choice(GREETINGS)}, {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
    for questions, answers in rng.sample(IDENTITY_TOPICS, rng.randint(1, 3)):
        question = rng.choice(questions)
        question = question.lower().rstrip("?.!") if rng.random() < 0.2 else question  # people type sloppily
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": rng.choice(answers)}]
    return {"messages": messages, "meta": {"source": "identity"}}


# -----------------------------------------------------------------------------
# the HF hub: smoltalk and a few tasks

def gsm8k_conversation(row) -> dict:
    answer = re.sub(r"<<[^>]*>>", "", row["answer"])  # drop the calculator annotations
    return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": answer}]}


def choice_conversation(question: str, letters: list[str], texts: list[str], answer: str) -> dict:
    """A multiple-choice question as a chat: the choices as "X. text" lines, the reply is the letter alone
    (the format chat_eval scores: nanochat/chat_tasks.py)."""
    choices = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts, strict=True))
    question = f"{question}\n\n{choices}\n\nAnswer with the letter of the correct choice."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _arc(row) -> dict:
    return choice_conversation(row["question"], row["choices"]["label"], row["choices"]["text"], row["answerKey"])


# name: (hub path, config, row -> conversation); split "train" reads the hub's train split, "val" its test split
HUB_SOURCES = {
    "smoltalk": ("HuggingFaceTB/smol-smoltalk", None, lambda row: {"messages": row["messages"]}),
    "gsm8k": ("openai/gsm8k", "main", gsm8k_conversation),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", _arc),
}


def _hub_unreachable() -> str | None:
    """Why the hub cannot be used right now, or None. Offline mode leaves only the local cache to try."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    try:
        urllib.request.urlopen(urllib.request.Request(HUB_PROBE_URL, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
    except (OSError, http.client.HTTPException) as e:
        return f"cannot reach {HUB_PROBE_URL}: {e}"
    return None


class HubUnavailable(RuntimeError):
    """Neither the HF hub nor its local cache can give a dataset now; the message says why."""


def hub_dataset(path: str, config: str | None, split: str):
    """A split of a hub dataset through `datasets` (HF_HUB_OFFLINE: from the cache only); HubUnavailable otherwise."""
    reason = _hub_unreachable()
    if reason is None:
        import datasets  # here, not at the top: importing it takes seconds and only hub sources need it
        try:
            return datasets.load_dataset(path, config, split=split)
        except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, hub errors) when offline
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    raise HubUnavailable(reason)


def load_hub(name: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """Up to n valid conversations of a hub source in a seeded order; [] (and a printed line) when unavailable."""
    path, config, convert = HUB_SOURCES[name]
    try:
        ds = hub_dataset(path, config, "train" if split == "train" else "test")
    except HubUnavailable as e:
        print0(f"chat data: {name} unavailable offline ({e}), skipped")
        return []
    rows = ds.shuffle(seed=seed).select(range(min(n, len(ds))))
    conversations = []
    for row in rows:
        conversation = convert(row)
        try:
            validate_conversation(conversation)
        except ValueError:
            continue  # a few hub rows break the turn format (e.g. empty turns); they are dropped, not repaired
        conversations.append(conversation)
    return conversations


# -----------------------------------------------------------------------------
# user .jsonl files

def load_jsonl(path) -> list[dict]:
    """Conversations of a .jsonl file, one per line ({"messages": [...]} or a list); errors name file and line."""
    path, conversations = Path(path), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = validate_conversation(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
            conversations.append({"messages": messages})
    return conversations


# -----------------------------------------------------------------------------
# the mix

GENERATED = ("identity", "longdoc_qa", "memory")


def parse_spec(spec: str) -> dict[str, float]:
    """"a,b:2,file.jsonl" -> {"a": 1.0, "b": 2.0, "file.jsonl": 1.0}; unknown names are an error."""
    weights = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, weight = part.rpartition(":")
        try:
            weight = float(weight)
        except ValueError:
            name, weight = part, 1.0
        if not (name in GENERATED or name in HUB_SOURCES or name.endswith(".jsonl")):
            raise ValueError(f"unknown chat data source {name!r} in {spec!r}: expected one of "
                             f"{', '.join(GENERATED + tuple(HUB_SOURCES))} or a path to a .jsonl file")
        if weight <= 0:
            raise ValueError(f"chat data source {part!r} in {spec!r}: the weight after ':' must be > 0")
        weights[name] = weight
    if not weights:
        raise ValueError(f"chat data spec {spec!r} names no source")
    return weights


def allocate(n: int, weights: dict[str, float], capacity: dict[str, int | None]) -> dict[str, int]:
    """Split n in proportion to weight; a source whose capacity (None = unlimited) is below its share
    gives all it has and the rest is re-split among the others."""
    counts, open_, left = {}, dict(weights), n
    while open_:
        total = sum(open_.values())
        shares = {s: left * w / total for s, w in open_.items()}
        full = [s for s in open_ if capacity[s] is not None and capacity[s] <= shares[s]]
        if not full:
            floors = {s: int(shares[s]) for s in open_}
            for s in sorted(open_, key=lambda s: floors[s] - shares[s])[:left - sum(floors.values())]:
                floors[s] += 1  # largest remainders first, so the counts add up to n
            counts.update(floors)
            break
        for s in full:
            counts[s], left = capacity[s], left - capacity[s]
            del open_[s]
    return counts


def load_conversations(spec: str, n: int, seed: int, split: str = "train", filler=None,
                       longdoc: LongDocQAConfig | None = None) -> list[dict]:
    """n conversations mixed from the sources in spec, shuffled; the same for the same arguments.

    filler: paragraphs for longdoc_qa documents (see book_paragraphs), synthetic text when None.
    longdoc: the longdoc_qa config; its seed is replaced by `seed`, the one seed of the mix.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    weights = parse_spec(spec)
    pools = {}  # finite sources, loaded up front so their size is known
    for name in weights:
        if name in HUB_SOURCES:
            pools[name] = load_hub(name, n, seed, split)
        elif name.endswith(".jsonl"):
            rows = load_jsonl(name)
            n_val = max(1, round(VAL_FRACTION * len(rows))) if len(rows) > 1 else 0
            pools[name] = rows[len(rows) - n_val:] if split == "val" else rows[:len(rows) - n_val]
    weights = {name: w for name, w in weights.items() if name not in pools or pools[name]}
    if not weights:
        raise ValueError(f"chat data {spec!r}: no source is available (see the lines above)")
    counts = allocate(n, weights, {name: len(pools[name]) if name in pools else None for name in weights})
    rng = random.Random(f"chat_data/{split}/{seed}")
    conversations = []
    for name, count in counts.items():
        if name == "identity":
            conversations += [identity_conversation(random.Random(f"identity/{split}/{seed}/{i}")) for i in range(count)]
        elif name == "longdoc_qa":
            conversations += longdoc_qa(count, replace(longdoc or LongDocQAConfig(), seed=seed), filler, split)
        elif name == "memory":
            conversations += memory_chats(count, (longdoc or LongDocQAConfig()).doc_words, filler, split, seed)
        else:
            conversations += rng.sample(pools[name], count)
    rng.shuffle(conversations)
    used = ", ".join(f"{name}: {count}" for name, count in counts.items())
    print0(f"chat data ({split}, seed {seed}): {len(conversations)} conversations from {used}")
    if len(conversations) < n:
        print0(f"chat data: WARNING asked for {n} conversations, the sources of {spec!r} only hold {len(conversations)}")
    return conversations
