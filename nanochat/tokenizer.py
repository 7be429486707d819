"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken.

rustbpe learns the merges (fast, parallel, streaming); tiktoken does inference (fast, batched).
On disk a tokenizer is three portable files in one directory (nothing that unpickles code):
    tokenizer.tiktoken  one "base64(token_bytes) rank" per line (tiktoken's own format)
    tokenizer.json      split pattern, special tokens with their ids, vocab_size, format version
    token_bytes.pt      int32 [vocab_size]: UTF-8 bytes per token, 0 for special tokens (weights_only)
The special tokens come after the mergeable ranks, so ids 0..255 are always the raw bytes.

Chat: `render_conversation` turns a conversation ({"messages": [{"role", "content"}, ...]}) into ids
and a loss mask for SFT, `render_for_completion` into a prompt that ends in <|assistant_start|>;
both check the conversation with `validate_conversation` first.
"""

import base64
import hashlib
import io
import json
import pickle
from pathlib import Path

import rustbpe
import tiktoken
import torch

from nanochat.common import get_base_dir, atomic_write_bytes, atomic_write_text

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; also the document separator in pretraining
    "<|system_start|>",
    "<|system_end|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (not 3): with a small
# vocabulary, merges are better spent on text than on all 1000 three-digit numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

FORMAT_VERSION = 1
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"

ROLES = ("system", "user", "assistant")  # chat roles; each one's turns are wrapped in <|ROLE_start|> ... <|ROLE_end|>


def validate_conversation(conversation) -> list[dict]:
    """The messages of a well-formed conversation, or a ValueError naming the first bad message.

    A conversation is {"messages": [...]} (other keys, e.g. "meta", are ignored) or a bare list of
    {"role", "content"} dicts: an optional system message first, then user/assistant turns
    alternating and starting with user. Every content is a non-blank str.
    """
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list):
        raise ValueError(f"a conversation is {{'messages': [...]}} or a list of messages, got {type(conversation).__name__}")
    if not messages:
        raise ValueError("conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only be the first message")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a str, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"message {i} ({role}): content is empty")
        if role != "system":
            expected = ("user", "assistant")[(i - (messages[0]["role"] == "system")) % 2]
            if role != expected:
                raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} (turns alternate user/assistant, starting with user)")
    if len(messages) == 1 and messages[0]["role"] == "system":
        raise ValueError("conversation has only a system message, no user turn")
    return messages


class TokenizerError(ValueError):
    """A tokenizer directory whose files are corrupt, of another version, or disagree with each other."""


def ranks_to_text(mergeable_ranks: dict[bytes, int]) -> str:
    """The ranks in tiktoken's file format, ordered by rank."""
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"


def text_to_ranks(text: str, path: Path) -> dict[bytes, int]:
    """Parse tiktoken's file format; any malformed line is reported with its line number."""
    ranks = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            token_b64, rank = line.split(" ")
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as e:  # binascii.Error is a ValueError too
            raise TokenizerError(f"corrupt tokenizer file {path}, line {lineno}: {line[:60]!r} ({e})") from e
    return ranks



class Tokenizer:
    """A tiktoken Encoding plus the special tokens of the chat format."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, special_tokens: list[str] = SPECIAL_TOKENS):
        n_ranks = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n_ranks)):
            raise ValueError(f"mergeable ranks must be exactly 0..{n_ranks - 1}, each used once")
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.special_tokens = {name: n_ranks + i for i, name in enumerate(special_tokens)}
        self.enc = tiktoken.Encoding(
            name="nanochat",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )

    # ---- training and persistence ----

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int) -> "Tokenizer":
        """Learn byte-level BPE merges from an iterator of strings; vocab_size includes the special tokens."""
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size <= min_size:
            raise ValueError(f"vocab_size={vocab_size} is too small: it must be > {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, n_ranks, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) < n_ranks:
            # rustbpe stops early once no pair is left to merge; a silently smaller vocab would surprise the model config
            raise ValueError(
                f"the training text only supports {len(mergeable_ranks) - 256} merges but vocab_size={vocab_size} needs "
                f"{n_ranks - 256}: give more text (--max_chars) or a smaller --vocab_size"
            )
        return cls(mergeable_ranks)

    def save(self, directory):
        """Write the three tokenizer files, each atomically, into directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / RANKS_FILE, ranks_to_text(self.mergeable_ranks))
        meta = {
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
            "identity": self.identity(),
        }
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
        buffer = io.BytesIO()
        torch.save(self.token_bytes(), buffer)
        atomic_write_bytes(directory / TOKEN_BYTES_FILE, buffer.getvalue())

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """Read a tokenizer written by save(); raises if files are missing or disagree with each other."""
        directory = Path(directory)
        missing = [name for name in (RANKS_FILE, META_FILE, TOKEN_BYTES_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no tokenizer in {directory} (missing {', '.join(missing)}): run `uv run python -m scripts.tok_train` first"
            )
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            version, pattern, special = meta["format_version"], meta["pattern"], meta["special_tokens"]
            vocab_size = meta["vocab_size"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise TokenizerError(f"corrupt tokenizer file {meta_path}: {e!r}") from e
        if version != FORMAT_VERSION:
            raise TokenizerError(f"{meta_path} has format_version={version}, this code reads {FORMAT_VERSION}: retrain with scripts.tok_train")
        ranks_path = directory / RANKS_FILE
        try:
            ranks_text = ranks_path.read_text(encoding="ascii")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"corrupt tokenizer file {ranks_path}: not ASCII ({e})") from e
        mergeable_ranks = text_to_ranks(ranks_text, ranks_path)
        # special tokens must sit right after the ranks, in the listed order
        names = sorted(special, key=special.get)
        expected = {name: len(mergeable_ranks) + i for i, name in enumerate(names)}
        if special != expected or len(mergeable_ranks) + len(special) != vocab_size:
            raise TokenizerError(
                f"inconsistent tokenizer in {directory}: {RANKS_FILE} has {len(mergeable_ranks)} ranks, "
                f"{META_FILE} says vocab_size={vocab_size} with special tokens {special}"
            )
        try:
            tokenizer = cls(mergeable_ranks, pattern, names)
        except ValueError as e:
            raise TokenizerError(f"corrupt tokenizer file {ranks_path}: {e}") from e
        if meta.get("identity") != tokenizer.identity():
            raise TokenizerError(f"inconsistent tokenizer in {directory}: identity in {META_FILE} does not match {RANKS_FILE}")
        tb_path = directory / TOKEN_BYTES_FILE
        try:
            token_bytes = torch.load(tb_path, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise TokenizerError(f"corrupt tokenizer file {tb_path}: {e}") from e
        if not isinstance(token_bytes, torch.Tensor) or not torch.equal(token_bytes, tokenizer.token_bytes()):
            raise TokenizerError(f"inconsistent tokenizer in {directory}: {TOKEN_BYTES_FILE} does not match {RANKS_FILE}")
        return tokenizer

    # ---- encoding and decoding ----

    def _special_id(self, token) -> int:
        """An id from a special-token name or an int id."""
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int], or list[str] -> list[list[int]]. Special-token text inside `text` is
        encoded as ordinary text; prepend/append (a special-token name or an id) add real ones."""
        head = [self._special_id(prepend)] if prepend is not None else []
        tail = [self._special_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [head + row + tail for row in rows]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(self.special_tokens)}")
        return self.special_tokens[name]

    def id_to_token(self, i: int) -> str:
        """The text of one token (invalid UTF-8 of a partial character shows as U+FFFD)."""
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def token_bytes(self, device="cpu") -> torch.Tensor:
        """int32 [vocab_size]: bytes each token decodes to, 0 for special tokens (they carry no text);
        dividing summed loss by summed token bytes gives bits per byte, comparable across vocabularies."""
        counts = torch.zeros(self.vocab_size, dtype=torch.int32)
        for token, rank in self.mergeable_ranks.items():
            counts[rank] = len(token)
        return counts.to(device)

    def identity(self) -> str:
        """Short stable hash of ranks, pattern and special tokens: equal iff two tokenizers encode alike."""
        h = hashlib.sha256()
        h.update(ranks_to_text(self.mergeable_ranks).encode("ascii"))
        h.update(json.dumps({"pattern": self.pattern, "special_tokens": self.special_tokens}, sort_keys=True).encode("utf-8"))
        return h.hexdigest()[:16]

    # ---- chat format ----

    def render_conversation(self, conversation, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """Tokens of a conversation for SFT, and a mask that is 1 exactly on what the model must learn to
        produce: each assistant turn's content and its <|assistant_end|> (not <|assistant_start|>, which the
        prompt supplies). Layout: <|bos|> [<|system_start|>..<|system_end|>] <|user_start|>..<|user_end|>
        <|assistant_start|>..<|assistant_end|> ...; cut to the first max_tokens tokens if given."""
        ids, mask = [self.bos_token_id], [0]
        for message in validate_conversation(conversation):
            role = message["role"]
            learn = int(role == "assistant")
            content = self.encode(message["content"])
            ids += [self.encode_special(f"<|{role}_start|>")] + content + [self.encode_special(f"<|{role}_end|>")]
            mask += [0] + [learn] * len(content) + [learn]
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation) -> list[int]:
        """Prompt tokens for generation: all turns (the last must be the user's), then <|assistant_start|>."""
        messages = validate_conversation(conversation)
        if messages[-1]["role"] != "user":
            raise ValueError(f"message {len(messages) - 1}: the last message must be a user message to complete, got {messages[-1]['role']}")
        ids, _ = self.render_conversation(messages)
        return ids + [self.encode_special("<|assistant_start|>")]


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by scripts.tok_train, from get_base_dir()/tokenizer."""
    return Tokenizer.load(get_base_dir() / "tokenizer")
