"""Chat memory: does a MegaContext chat model recall a fact the user told many working contexts earlier?

Held-out memory conversations (nanochat.memory_chat: the user tells three facts, shares book passages of the
pretraining corpus' val split, then asks for one fact) with a fixed number of filler words are replayed into an
MCConversation (mc/chat.py) as a user of `chat_cli --mc` would type them, turn by turn (the dataset's assistant
turns are appended, not generated); then the question is asked and the greedy reply is correct when it holds
the asked value. The filler length is fitted on a few rendered conversations so that the asked fact lies at
least about `distance` working contexts (W tokens each) before the question (15 % more on average). Reported:
accuracy overall, by the measured distance (tokens from the end of the asked fact's turn to the question) in
units of W and by the fact's kind; how often the focus at the question shows the tokens of the asked value raw
(LensNet expanded their block) and the accuracy then (the GPT's reading); and how often the reply holds another
fact of the conversation instead.
"""

import math
import time

import torch

from mc.chat import MCConversation
from mc.working_context import RAW
from nanochat.memory_chat import memory_chats
from nanochat.progress import Progress

DISTANCE_BINS = (0, 4, 8, 16)  # in units of W: [0, 4W), [4W, 8W), [8W, 16W), >= 16W
REPLY_TOKENS = 24


def fact_distance(tokenizer, chat: dict) -> int:
    """Tokens from the end of the asked fact's exchange to the question's <|assistant_start|> (the chat format)."""
    messages, asked = chat["messages"], chat["meta"]["asked"]
    fact = tokenizer.render_conversation({"messages": messages[:2 * asked + 2]})[0]
    return len(tokenizer.render_for_completion(messages[:-1])) - len(fact)


def value_tokens(tokenizer, chat: dict) -> tuple[int, int]:
    """[start, end) of the fewest tokens of the conversation (the chat format) that hold the asked value."""
    messages, asked, value = chat["messages"], chat["meta"]["asked"], chat["meta"]["answer"]
    ids = tokenizer.render_for_completion(messages[:2 * asked + 1])
    end = next(j for j in range(len(ids) + 1) if value in tokenizer.decode(ids[:j]))
    start = next(i for i in range(end, -1, -1) if value in tokenizer.decode(ids[i:end]))
    return start, end


def filler_words_for(tokenizer, filler: list[str], tokens: int, probe_words: int = 400, probes: int = 8) -> int:
    """Filler words that put the asked fact about `tokens` tokens before the question: the distance of a few
    conversations without filler (the other facts, the question) and with probe_words words of it, fitted linearly."""
    empty = memory_chats(probes, 0, filler, split="calibration")
    full = memory_chats(probes, probe_words, filler, split="calibration", min_words=probe_words)
    base = sum(fact_distance(tokenizer, c) for c in empty) / probes
    per_word = (sum(fact_distance(tokenizer, c) for c in full) / probes - base) / probe_words
    return max(0, math.ceil((tokens - base) / per_word))


def memory_eval(controller, tokenizer, n: int, filler: list[str], autocast, distance: float = 8.0, seed: int = 0,
                show_progress: bool = True) -> dict:
    """Accuracy of n replayed memory conversations with the asked fact ~distance x W tokens back (see above)."""
    W, K = controller.cfg.wc_budget, controller.cfg.block_size
    words = filler_words_for(tokenizer, filler, round(1.15 * distance * W))  # a margin: distances spread ~+-10 %
    chats = memory_chats(n, words, filler, split="val", seed=seed, min_words=words)
    conversation = MCConversation(controller, tokenizer, temperature=0.0, top_k=None, max_tokens=REPLY_TOKENS,
                                  autocast=autocast)
    rows, t0 = [], time.perf_counter()
    progress = Progress(n, desc="chat memory", enabled=show_progress)
    for chat in chats:
        meta, messages = chat["meta"], chat["messages"]
        conversation.clear()
        with autocast(), torch.no_grad():
            for k in range(0, len(messages) - 2, 2):
                conversation.tell(messages[k]["content"], messages[k + 1]["content"])
            history = conversation.session.num_tokens
            stream = conversation.reply(meta["question"])  # the focus is decided before the reply is generated
            start, end = value_tokens(tokenizer, chat)
            shown = conversation.session.lod_map[start // K:-(-end // K)]
            reply = "".join(stream)
        others = [v for j, v in enumerate(meta["values"]) if j != meta["asked"]]
        rows.append({"distance": fact_distance(tokenizer, chat) / W, "kind": meta["kind"], "history": history,
                     "raw": bool((shown == RAW).all()), "correct": meta["answer"] in reply,
                     "other_fact": any(v in reply for v in others), "answer": meta["answer"], "reply": reply})
        progress.update(correct=sum(r["correct"] for r in rows))
    progress.close()
    accuracy = lambda rs: sum(r["correct"] for r in rs) / len(rs) if rs else None  # noqa: E731
    share = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    bins = []
    for lo, hi in zip(DISTANCE_BINS, [*DISTANCE_BINS[1:], math.inf]):
        inside = [r for r in rows if lo <= r["distance"] < hi]
        name = f"{lo}W-{hi}W" if hi < math.inf else f">={lo}W"
        bins.append({"distance": name, "n": len(inside), "accuracy": accuracy(inside)})
    far = [r for r in rows if r["distance"] >= 8]
    kinds = {}  # the asked fact's kind (number, place, word) -> its rows
    for r in rows:
        kinds.setdefault(r["kind"], []).append(r)
    return {"n": n, "wc_budget": W, "filler_words": words, "accuracy": accuracy(rows), "accuracy_from_8W": accuracy(far),
            "n_from_8W": len(far), "fact_shown_raw": share("raw"),
            "accuracy_when_shown_raw": accuracy([r for r in rows if r["raw"]]),
            "other_fact_rate": share("other_fact"), "mean_distance_W": share("distance"),
            "mean_history_tokens": share("history"), "by_distance": bins,
            "by_kind": {kind: {"n": len(rs), "accuracy": accuracy(rs)} for kind, rs in sorted(kinds.items())},
            "examples": [f"{r['answer']!r} at {r['distance']:.1f}W -> {r['reply']!r}" for r in rows[:4]],
            "seconds": round(time.perf_counter() - t0, 1)}
