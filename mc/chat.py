"""MCConversation: a chat whose history is one MCSession, so it never runs out (docs/architecture.md §9).

Every turn is appended to the session's token stream in the chat format of
`Tokenizer.render_conversation` (<|bos|> once, then <|user_start|>..<|user_end|><|assistant_start|>
per user turn; the reply is sampled into the stream and closed by <|assistant_end|>). Nothing is
re-read: the tree grows by the new tokens, the working context stays within W and LensNet decides
which old turns are shown in full. The CLI (scripts/chat_cli.py --mc) drives it through `clear`,
`reply`, `save`, `load`, `focus` and `stats`, the same loop as a plain conversation.
"""

from pathlib import Path

from mc.focus_map import plot_focus, runs
from mc.session import DEFAULT_REFOCUS_INTERVAL, MCSession
from mc.working_context import GIST, GROUP, RAW, UNCOVERED
from nanochat.engine import stream_text

SPAN_NAMES = {RAW: "raw tokens", GIST: "LOD1 gists", GROUP: "LOD2 gists", UNCOVERED: "uncovered (dropped)"}


class MCConversation:
    """An unbounded chat: one MCSession holds every turn; `reply(text)` streams the answer's text pieces."""

    def __init__(self, controller, tokenizer, temperature: float, top_k: int | None, max_tokens: int, seed: int = 42,
                 autocast=None, refocus_interval: int = DEFAULT_REFOCUS_INTERVAL):
        self.controller, self.tokenizer = controller, tokenizer
        self.temperature, self.top_k, self.max_tokens, self.seed = temperature, top_k, max_tokens, seed
        self.autocast, self.refocus_interval = autocast, refocus_interval
        self.user_start, self.user_end, self.assistant_start, self.assistant_end = (
            tokenizer.encode_special(f"<|{name}|>") for name in ("user_start", "user_end", "assistant_start", "assistant_end"))
        self.stop_tokens = [self.assistant_end, tokenizer.bos_token_id]
        self.clear()

    def clear(self):
        self.session = MCSession(self.controller, refocus_interval=self.refocus_interval, autocast=self.autocast,
                                 tokenizer_id=self.tokenizer.identity())
        self.session.append([self.tokenizer.bos_token_id])
        self.turns, self.cut = 0, ""

    def reply(self, text: str):
        """Append a user turn; return a stream of the reply's text pieces as they are generated. The focus is
        decided again once the question is in (LensNet reads it and scores every block of the history: the
        refocuses while the reply is generated score only the session's lookback, the rest keeps these scores)."""
        self.session.append([self.user_start, *self.tokenizer.encode(text), self.user_end, self.assistant_start])
        self.session.refocus(lookback=self.session.num_tokens)  # the whole history: what the question asks about
        self.turns += 1
        return self._stream()

    def tell(self, user: str, assistant: str):
        """Append a whole exchange, the assistant's turn given rather than generated (a transcript replayed)."""
        encode = self.tokenizer.encode
        self.session.append([self.user_start, *encode(user), self.user_end, self.assistant_start, *encode(assistant),
                             self.assistant_end])
        self.turns += 1

    def _stream(self):
        tokens = self.session.generate(self.max_tokens, self.temperature, self.top_k, seed=self.seed + self.turns,
                                       stop_tokens=self.stop_tokens)
        stop = yield from stream_text(self.tokenizer, tokens, self.stop_tokens, [])
        ended = stop == self.assistant_end
        if not ended:  # a reply cut at --max_tokens (or ended by BOS) still closes its turn
            self.session.append([self.assistant_end])
        self.cut = "" if ended else f"(the reply stopped at --max_tokens={self.max_tokens})"

    # ---- commands ------------------------------------------------------------------------------

    def save(self, path) -> str:
        self.session.save(path)
        return f"saved the conversation ({self.session.num_tokens:,} tokens of history) to {path}"

    def load(self, path) -> str:
        """Continue a saved conversation; the current one is kept when the file cannot be used."""
        self.session = MCSession.load(path, self.controller, tokenizer_id=self.tokenizer.identity(),
                                      refocus_interval=self.refocus_interval, autocast=self.autocast)
        self.cut = ""
        return f"loaded {path}: {self.session.num_tokens:,} tokens of history"

    def focus(self, path) -> str:
        """The working context as spans of history (text) and a focus-map PNG at `path`."""
        state = self.session.state()
        K, T, mix = state["block_size"], state["history_tokens"], state["lod_mix"]
        lines = [f"history {T:,} tokens; working context {state['wc_entries']}/{state['wc_budget']} entries "
                 f"({', '.join(f'{k} {v}' for k, v in mix.items())})"]
        starts, lengths, values = runs(state["lod_map"])
        spans = [(int(s) * K, int(s + n) * K, int(v)) for s, n, v in zip(starts, lengths, values)]
        if T % K:
            spans.append((T - T % K, T, RAW))
        for begin, end, level in spans:
            entries = {RAW: end - begin, UNCOVERED: 0}.get(level, -(-(end - begin) // K ** level))  # a partial node counts 1
            name = SPAN_NAMES.get(level, f"LOD{level} gists")
            lines.append(f"  tokens {begin:>8,} - {end:>8,}  {name:<20} {entries:>5} entries")
        written = plot_focus(state, Path(path))
        lines.append(f"focus map: {written}")
        return "\n".join(lines)

    def stats(self) -> str:
        s = self.session.state()
        return (f"history {s['history_tokens']:,} tokens | working context {s['wc_entries']}/{s['wc_budget']} entries | "
                f"refocuses {s['refocus_count']} (budget fits {s['budget_fits']}, map changes {s['map_changes']}) | "
                f"decode {s['decode_tokens_per_s']:.1f} tok/s | append {s['append_tokens_per_s']:.0f} tok/s | "
                f"KV reuse {s['kv']['reuse_fraction']:.0%}")
