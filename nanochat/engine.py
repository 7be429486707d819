"""Sampling with a KV cache: one prefill of the prompt, then one token per step for a batch of samples.

The prompt is prefilled once at batch size 1 and its cache is copied to `num_samples` rows, so
several samples of one prompt cost one prefill. Generation streams: `generate` yields the next
token of every row as soon as it is sampled; rows that produced a stop token are finished and
are padded with the stop token from then on.

`generate_sessions` is the same loop over MegaContext sessions (mc/session.py), one history per row:
sampling is batched, but every session runs its own forward, because rows differ in working
context, focus and KV-reuse point (docs/architecture.md §9).

Decoding under autocast: autocast casts every weight to the low-precision dtype in every forward and drops
the copies when the outermost autocast region exits, so one token per forward spends much of its time
casting (CPU, depth 4, bf16: ~2.5 ms a token vs ~1.7 with the copies kept). Code that decodes many tokens
holds one autocast region open around its loop (`generate_batch`, chat_cli, bench_infer): the weights are cast
once, and the per-forward regions inside nest in it (same casts, same numbers). Not inside `generate` itself:
a generator would leave the region open in its caller's code between tokens.
"""

import contextlib

import torch
import torch.nn.functional as F


def sample_next_token(logits, generator, temperature: float = 1.0, top_k: int | None = None):
    """logits [B, V] -> token ids [B]; temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stream_text(tokenizer, token_ids, stop_tokens, reply_ids: list):
    """Yield the text of `token_ids` (an iterator) piece by piece as it grows, holding back a multi-byte
    character until it is complete, up to the first stop token. The ids before it are appended to
    `reply_ids`; returns the stop token, or None when the ids ran out (use with `yield from`)."""
    shown = 0
    for token in token_ids:
        if token in stop_tokens:
            return token
        reply_ids.append(token)
        text = tokenizer.decode(reply_ids)
        if not text.endswith("\ufffd"):
            yield text[shown:]
            shown = len(text)
    text = tokenizer.decode(reply_ids)
    if len(text) > shown:
        yield text[shown:]
    return None


class Engine:
    def __init__(self, model, autocast=None):
        self.model = model
        self.autocast = autocast  # a context-manager factory, or None for plain precision

    def _forward(self, *args, **kwargs):
        if self.autocast is None:
            return self.model(*args, **kwargs)
        with self.autocast():
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 42, stop_tokens=()):
        """Yield a list of `num_samples` token ids per step, for at most `max_tokens` steps."""
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (start it with the BOS token)")
        model = self.model
        device = model.lm_head.weight.device
        capacity = len(tokens) + max_tokens
        generator = torch.Generator(device=device).manual_seed(seed)
        prefill_cache = model.new_kv_cache(1, capacity)
        logits = self._forward(torch.tensor([tokens], device=device), kv_cache=prefill_cache, logits_to_keep=1)[:, -1]
        cache = model.new_kv_cache(num_samples, capacity)
        cache.copy_prefix_from(prefill_cache)
        logits = logits.expand(num_samples, -1)
        stop = torch.tensor(list(stop_tokens) or [-1], device=device)
        done = torch.zeros(num_samples, dtype=torch.bool, device=device)
        for _ in range(max_tokens):
            next_ids = sample_next_token(logits, generator, temperature, top_k)
            next_ids = torch.where(done, stop[0], next_ids)
            yield next_ids.tolist()
            done |= torch.isin(next_ids, stop)
            if done.all():
                return
            logits = self._forward(next_ids[:, None], kv_cache=cache)[:, -1]

    @torch.no_grad()
    def generate_sessions(self, sessions, max_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                          seed: int = 42, stop_tokens=()):
        """Yield a list with the next token of every session per step, like `generate`; each sampled token
        joins its session's history. Finished sessions are padded with the stop token and not advanced."""
        if not sessions:
            raise ValueError("generate_sessions needs at least one session")
        device = self.model.lm_head.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        stop = torch.tensor(list(stop_tokens) or [-1], device=device)
        done = torch.zeros(len(sessions), dtype=torch.bool, device=device)
        for _ in range(max_tokens):
            logits = torch.stack([session.logits() for session in sessions])  # [S, vocab]
            next_ids = torch.where(done, stop[0], sample_next_token(logits, generator, temperature, top_k))
            column = next_ids.tolist()
            yield column
            for session, token, finished in zip(sessions, column, done.tolist()):
                if not finished:
                    session.append([token])
            done |= torch.isin(next_ids, stop)
            if done.all():
                return

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> list[list[int]]:
        """Prompt + completion of every sample, cut after its first stop token."""
        stop_tokens = set(kwargs.get("stop_tokens", ()))
        rows = [list(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():  # weights cast once
            for column in self.generate(tokens, num_samples, **kwargs):
                for i, token in enumerate(column):
                    if not finished[i]:
                        rows[i].append(token)
                        finished[i] = token in stop_tokens
        return rows
