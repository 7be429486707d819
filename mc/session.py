"""MCSession: MegaContext inference over one growing token stream (docs/architecture.md §9, §12).

One session = one stream (B = 1): streams decoded together would differ in LOD maps, refocus
points and KV-reuse points, so a batch would degrade to per-row work. Many streams = many sessions.

State (tensors on the model's device):
    tree     MCTree: ids, LOD0 embeddings, gists of every level (as deep as the history needs, partial
             gists with cfg.partial_gists); grows by every token, O(1) amortised
    lod_map  [n_blocks] int8 over the complete blocks (RAW/GIST/level l/UNCOVERED); the partial block
             (T % K tokens) is always raw and not in the map
    entries  the WC as an entry table pos [W], lod [W], rope [W, 2, hd/2] (first n_entries rows),
             always equal to `entry_table(lod_map, T, cfg)`
    cache    the GPT's KVCache, valid for the first `_valid` entries of that table

A token's way (`append`; `generate` appends each sampled token):
 1. the tree appends it (a gist when its block completes); a completed block enters the map RAW, so
    earlier entries never change: the token is one new raw row of the table and the cache only
    grows (decode = a 1-entry forward; no per-token work depends on the history length);
 2. every `refocus_interval` tokens, and whenever the WC exceeds W, `refocus` decides the focus
    afresh, as evaluation does (`MCController.focus`): LensNet scores each block of the last
    `lookback` tokens (default 16·W) older than the raw tail as a LOD1 gist (in windows of W entries, the
    WCs it was trained on; older blocks keep the score of the last refocus that scored them), and from
    the most compressed map of the whole history (raw tail, then the highest nodes of the tree; the
    oldest entries UNCOVERED only when even that does not fit W) the best blocks are shown raw (beside
    the gist that covers them, or in place) and the nodes above them opened while they fit W
    (`MCController.select`). So the focus is a function of the history and its scores, not of earlier
    focus decisions, and a periodic refocus costs one LensNet window plus a few tensor operations over
    the map (int8, one column a block), however long the history.
    `refocus(lookback=T)` scores the whole history (linear in it): a chat does that once per user turn,
    so a question can pull any block back in full, and the refocuses while it answers keep those
    scores. Capacity: the tree grows as deep as the history needs, so
    the most compressed cover needs one entry per non-zero base-K digit of the older blocks with
    cfg.partial_gists (a partial gist per level) and up to K-1 per level without; history is dropped
    (oldest first) only when that no longer fits W beside the raw tail. When the boundary of the raw
    tail moves, a shown partial node whose children changed is opened into its children (its gist is
    gone from the tree); the budget fit or the next refocus compresses again;
 3. KV reuse: a map change rebuilds the table, compares it with the old one (pos, lod: one vector
    compare), and the cache is kept up to the first changed entry; the next `logits()` recomputes
    only the entries from there on (one chunk prefill, the GPT's explicit-mask path).
Logits are lazy: appending a long prompt (in chunks of `append_chunk` = W tokens, one refocus per
chunk when due) runs no GPT forward; the first `logits()` prefills at most W entries.
`recompute_logits()` (fresh materialisation + full forward) is the reference for tests.

Choices recorded here:
- `refocus_interval` (default 32 = the default K) is a session argument, not an MCConfig field.
- Rotary tables come from `mc.positional.wc_rope`; appended raw tokens take rows of a standard-RoPE
  table computed ahead (span-1 `gaussian` = standard RoPE at the position, `index` = standard RoPE
  at the entry index), so a decode step computes no tables. Past the GPT's training length the table
  is laid out in a frame (`mc.positional.rope_frame`, fixed at each map change, moving in steps of
  sequence_len/8) that keeps every distance in range; appended tokens are in its exact part, and a
  frame move changes the older rows, so the cache is kept only up to the first changed row.
- Dropped (UNCOVERED) history is not lost: the tree keeps its gists, and a refocus shows them again as
  soon as they fit (e.g. when a LOD2 group completes and compresses its K gists into one).
- `save` stores ids, gists (complete and partial), the map, the block scores and counters, not LOD0 (re-embedded
  exactly on load) nor the KV cache (one prefill). Format 2 (trees of any depth, partial gists);
  files of format 1 (trees capped at LOD2) are refused with a one-line error (format and checks: mc/session_file.py).
  It records the MCConfig, the GPT config hash, a fingerprint of the weights
  that made the stored gists (embedding + GistNet), the tokenizer identity and a digest of the whole
  content; `load` refuses any mismatch, a wrong version, a changed digest and corrupt/truncated/foreign
  files with a ValueError saying which.
"""

import contextlib
import io
import os
import time
from collections import deque
from dataclasses import asdict

import torch
import torch.nn.functional as F

from mc.allocator import NEG
from mc.config import LEGACY_MC_CONFIG, MCConfig
from mc.positional import rope_frame, wc_rope
from mc.session_file import (FORMAT, FORMAT_VERSION, config_hash, content_digest, read_session_file,
                             weights_fingerprint)
from mc.tree import MCTree, boundary, partial_nodes, shown_end
from mc.working_context import (RAW, UNCOVERED, WorkingContext, gist_starts, entry_counts, entry_token_ids, is_legal,
                                materialize, max_level, most_compressed_map, open_partial_nodes)
from nanochat.common import atomic_write_bytes
from nanochat.engine import sample_next_token

DEFAULT_REFOCUS_INTERVAL = 32
ROPE_AHEAD = 1024  # standard rotary rows computed at once for appended raw tokens
EDIT_LOG = 2048  # map-change events kept for the focus map


def entry_table(lod_map, history_len: int, cfg: MCConfig):
    """Map [n] + history length -> the WC's entries in order: pos [E] long (global start), lod [E] long,
    span [E] long (tokens covered: K^lod, a partial node its children's). A block contributes the gist of the
    node it starts (if shown), then its K tokens if RAW (in place, or beside that node's gist)."""
    K = cfg.block_size
    lod = lod_map.long()
    n = lod.numel()
    b = torch.arange(n, device=lod.device)
    gist = gist_starts(lod[None], K)[0]  # [n] level of the gist starting at each block (0: none)
    blocks = torch.ones_like(lod)  # blocks covered by that gist: its node's, up to what the level may show
    for level in range(2, max_level(n, K) + 1):
        size = K ** (level - 1)
        shown = torch.clamp(shown_end(n, level, cfg) - b, 0, size)  # [n] of a node starting at b
        blocks = torch.where(gist == level, shown, blocks)
    has_gist = (gist > 0).long()
    count = has_gist + K * (lod == RAW).long()
    block = torch.repeat_interleave(b, count)  # [E_blocks] block of each entry
    offset = torch.arange(block.numel(), device=lod.device) - (count.cumsum(0) - count)[block]
    is_gist = (offset == 0) & (gist[block] > 0)
    pos = block * K + torch.where(is_gist, 0, offset - has_gist[block])
    elod = torch.where(is_gist, gist[block], 0)
    span = torch.where(is_gist, blocks[block] * K, 1)
    tail = torch.arange(n * K, history_len, device=lod.device)  # the partial block, raw
    return torch.cat([pos, tail]), torch.cat([elod, torch.zeros_like(tail)]), torch.cat([span, torch.ones_like(tail)])


class MCSession:
    """One growing stream decoded through a working context of at most W entries (see module docstring)."""

    def __init__(self, controller, *, refocus_interval: int = DEFAULT_REFOCUS_INTERVAL,
                 tokenizer_id: str | None = None, append_chunk: int | None = None, autocast=None, capacity: int = 1024,
                 lookback: int | None = None):
        cfg: MCConfig = controller.cfg
        K, W, R = cfg.block_size, cfg.wc_budget, cfg.recent
        if R + K - 1 > W:
            raise ValueError(f"an MC session keeps the last --mc_recent={R} tokens plus up to K-1={K - 1} tokens of the "
                             f"current block raw: it needs --mc_wc_budget >= {R + K - 1}, got {W}")
        if refocus_interval < 1:
            raise ValueError(f"refocus_interval ({refocus_interval}) must be >= 1")
        self.lookback = 16 * W if lookback is None else lookback  # tokens whose blocks a refocus scores afresh
        if self.lookback < 1:
            raise ValueError(f"lookback ({self.lookback}) must be >= 1 token")
        self.controller, self.model, self.cfg = controller, controller.model, cfg
        self.refocus_interval, self.tokenizer_id = refocus_interval, tokenizer_id
        self.append_chunk = append_chunk or W
        self.autocast = autocast  # context-manager factory (e.g. bf16 autocast), or None
        self.device = self.model.lm_head.weight.device
        self.head_dim = self.model.config.head_dim
        self.tree = MCTree(cfg, self.model.transformer.wte, controller.gistnet, capacity=capacity)
        self._map = torch.zeros(max(capacity // K, 1), dtype=torch.int8, device=self.device)  # [cap] int8
        self._scores = torch.full_like(self._map, NEG, dtype=torch.float)  # [cap] LensNet's last score of each block
        self.n_blocks = 0
        self._pos = torch.zeros(W, dtype=torch.long, device=self.device)  # entry table, first n_entries rows
        self._lod = torch.zeros(W, dtype=torch.long, device=self.device)
        self._span = torch.ones(W, dtype=torch.long, device=self.device)
        self._rope = torch.zeros(W, 2, self.head_dim // 2, device=self.device)  # [W, (cos, sin), hd/2] fp32
        self._cos, self._sin = self._rope[None, :, None, 0], self._rope[None, :, None, 1]  # views [1, W, 1, hd/2]
        self.max_len = controller.max_len  # rotary distances stay below it
        self._frame = rope_frame(0, self.max_len)  # the frame of the table's rotary rows
        self.n_entries = 0  # entries of the WC (may exceed W inside `_append`, until the budget fit)
        self._tab_len = 0  # rows of the table that describe the current WC's first entries
        self.cache = self.model.new_kv_cache(1, W)
        self._valid = 0  # leading cache entries equal to the entry table
        self._logits = None  # [vocab] next-token logits, while still valid
        self._ahead = (0, self._rope.new_zeros(0, 2, self.head_dim // 2))  # (first position, rows)
        self._since_refocus = 0
        self.stats = dict(refocus=0, budget_fits=0, map_changes=0, forwards=0, prefills=0, kv_reused=0, kv_computed=0,
                          decode_tokens=0, decode_seconds=0.0, append_tokens=0, append_seconds=0.0)
        self.edits = deque(maxlen=EDIT_LOG)  # {event, kind, history, expanded [blocks], collapsed [blocks]}

    @classmethod
    def begin(cls, controller, prompt_ids, **kwargs) -> "MCSession":
        """A new session holding `prompt_ids` (any length); kwargs as for the constructor."""
        session = cls(controller, **kwargs)
        session.append(prompt_ids)
        return session

    def _amp(self):
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    # ---- reading -------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.tree.T

    @property
    def lod_map(self):
        """[n_blocks] int8 view of the current map."""
        return self._map[:self.n_blocks]

    def entries(self):
        """(pos [E], lod [E]) views of the current WC's entry table."""
        return self._pos[:self.n_entries], self._lod[:self.n_entries]

    def _entry_embeds(self, pos, lod):
        """Embeddings [m, D] of entries (pos, lod [m]): token embeddings or gists of the tree."""
        tree, K = self.tree, self.cfg.block_size
        out = tree.lod0_cache[0, pos] if tree.lod0_cache is not None else \
            self.model.transformer.wte(tree.ids[0, pos]).to(tree.dtype)
        for level, gists in enumerate(tree.gists, start=1):
            index = (pos // K ** level).clamp(max=gists.size(1) - 1)
            out = torch.where((lod == level)[:, None], gists[0, index], out)
        nodes, partial = tree.partial
        for p, (level, g, _) in enumerate(nodes):
            out = torch.where(((lod == level) & (pos == g * K ** level))[:, None], partial[0, p], out)
        return out

    @torch.no_grad()
    def working_context(self, lod_map=None) -> WorkingContext:
        """The WC of `lod_map` [n_blocks] (default: the current map) as a right-padded batch of one ([1, W]
        tensors, wider if the map holds more entries), like `materialize` builds it."""
        W, T = self.cfg.wc_budget, self.tree.T
        lod_map = self.lod_map if lod_map is None else lod_map
        pos, lod, span = entry_table(lod_map, T, self.cfg)  # [E]
        E = pos.numel()
        pad = max(W, E) - E
        valid = torch.arange(E + pad, device=self.device) < E
        pos, lod, span = F.pad(pos, (0, pad)), F.pad(lod, (0, pad)), F.pad(span, (0, pad), value=1)
        embeds = torch.where(valid[:, None], self._entry_embeds(pos, lod), 0.0)  # [W, D]
        after = self.tree.ids[0, (pos + 1).clamp(max=max(T - 1, 0))]
        targets = torch.where(valid & (lod == RAW) & (pos + 1 < T), after, -1)
        return WorkingContext(embeds[None], pos[None], span[None], lod[None], targets[None], valid[None],
                              torch.zeros(1, dtype=torch.long, device=self.device), lod_map[None], T)

    # ---- growing -------------------------------------------------------------------------------

    def _std_rope(self, q0: int, n: int):
        """Standard rotary rows [n, 2, hd/2] of integer positions [q0, q0 + n), from a table computed ahead."""
        start, rows = self._ahead
        if not (start <= q0 and q0 + n <= start + rows.size(0)):
            q = torch.arange(q0, q0 + max(n, ROPE_AHEAD), device=self.device)[None]  # [1, L]
            ones = torch.ones_like(q)
            cos, sin = wc_rope(q, ones, ones * 0, ones.bool(), self.head_dim, "gaussian")  # span 1 = standard RoPE
            start, rows = q0, torch.stack([cos[0, :, 0], sin[0, :, 0]], dim=1)  # [L, 2, hd/2]
            self._ahead = (start, rows)
        return rows[q0 - start:q0 - start + n]

    def _extend(self, ids):
        """Append ids [c] to the tree and the map; the c new raw entries join the table if it has room."""
        K, W = self.cfg.block_size, self.cfg.wc_budget
        c, T0 = ids.numel(), self.tree.T
        partial = self.tree.partial[0]  # the partial nodes before the boundary moves
        self.tree.append(ids[None])
        n_new = (T0 + c) // K - self.n_blocks
        if n_new:  # completed blocks enter the map raw: their entries do not change
            if self.n_blocks + n_new > self._map.numel():
                size = max(2 * self._map.numel(), self.n_blocks + n_new)
                grown = self._map.new_zeros(size)
                grown[:self.n_blocks] = self.lod_map
                self._map = grown
                scores = self._scores.new_full((size,), NEG)
                scores[:self.n_blocks] = self._scores[:self.n_blocks]
                self._scores = scores
            self._map[self.n_blocks:self.n_blocks + n_new] = RAW
            self.n_blocks += n_new
        E0 = self.n_entries
        if E0 + c <= W and self._tab_len == E0:  # the table stays exact: write the new rows
            if c == 1:
                self._pos[E0] = T0
            else:
                self._pos[E0:E0 + c] = torch.arange(T0, T0 + c, device=self.device)
            # self._lod[E0:E0 + c] is already RAW and self._span 1: rows past the table are kept so by `_set_map`
            rope_q = T0 if self.cfg.positional == "gaussian" else E0
            self._rope[E0:E0 + c] = self._std_rope(rope_q, c)
            self._tab_len = E0 + c
        self.n_entries = E0 + c
        self._logits = None
        self._since_refocus += c
        stale = [node for node in partial if node not in self.tree.partial[0]]
        if stale:
            self._open_stale(stale)

    def _open_stale(self, nodes):
        """After the boundary moved: open the partial nodes (level, g, j) whose gists the tree replaced, where the
        map shows them (`open_partial_nodes`). The table is rebuilt when the map still fits W, else the budget fit
        of `_maintain` refocuses."""
        K = self.cfg.block_size
        shown = torch.stack([(self._map[g * K ** (level - 1):(g * K + j) * K ** (level - 2)] == level).any()
                             for level, g, j in nodes]).tolist()
        nodes = [node for node, yes in zip(nodes, shown) if yes]
        if not nodes:
            return
        fixed = open_partial_nodes(self.lod_map[None], nodes, K)[0]
        self.n_entries = int(entry_counts(fixed[None], K, self.tree.T % K)[0])
        if self.n_entries <= self.cfg.wc_budget:
            self._set_map(fixed, None)
        else:  # over W: the budget fit of `_maintain` refocuses, comparing the new table with the current one
            self._map[:self.n_blocks] = fixed

    def _set_map(self, new_map, kind: str | None, frame: int | None = None) -> bool:
        """Install map [n] in rotary frame `frame` (default: the frame of the current history): rebuild the entry
        table, keep the cache up to the first changed entry, log the edits under `kind` (None: no log).
        Returns False (and does nothing) when neither the map nor the frame changes."""
        W, T = self.cfg.wc_budget, self.tree.T
        new_map = new_map.to(torch.int8)
        frame = rope_frame(T - 1, self.max_len) if frame is None else frame
        if (kind is not None and self._tab_len == self.n_entries and torch.equal(new_map, self.lod_map)
                and frame == self._frame):
            return False
        old_map = self.lod_map.clone()
        self._map[:self.n_blocks] = new_map
        pos, lod, span = entry_table(new_map, T, self.cfg)
        E = pos.numel()
        if E > W:
            raise ValueError(f"internal: a map of {E} entries exceeds --mc_wc_budget={W}")
        self._frame = frame
        valid = torch.ones_like(pos, dtype=torch.bool)[None]  # the table starts at entry 0, so `index` mode works too
        cos, sin = wc_rope(pos[None], span[None], lod[None], valid, self.head_dim, self.cfg.positional,
                           max_len=self.max_len, frame=torch.tensor([self._frame], device=self.device))
        rope = torch.stack([cos[0, :, 0], sin[0, :, 0]], dim=1)  # [E, 2, hd/2]
        m = min(self._tab_len, E)
        differ = ((self._pos[:m] != pos[:m]) | (self._lod[:m] != lod[:m]) | (self._span[:m] != span[:m])
                  | (self._rope[:m] != rope[:m]).flatten(1).any(1))  # a partial node's span changes with its gist
        first = int(torch.cat([differ, differ.new_ones(1)]).long().argmax())  # first changed entry (m if none)
        self._pos[:E], self._lod[:E], self._span[:E] = pos, lod, span
        self._lod[E:], self._span[E:] = RAW, 1
        self._rope[first:E] = rope[first:]
        self.n_entries = self._tab_len = E
        self._valid = min(self._valid, first)
        self._logits = None
        if kind is not None:
            self._log_edits(old_map, new_map, kind)
        return True

    def _log_edits(self, old_map, new_map, kind: str):
        detail = lambda lod: torch.where(lod == UNCOVERED, 0, 127 - lod.long())  # noqa: E731  raw > LOD1 > LOD2 > ... > none
        change = detail(new_map) - detail(old_map)
        expanded, collapsed = (change > 0).nonzero()[:, 0].tolist(), (change < 0).nonzero()[:, 0].tolist()
        if expanded or collapsed:
            self.stats["map_changes"] += 1
            self.edits.append(dict(event=self.stats["refocus"] + self.stats["budget_fits"], kind=kind,
                                   history=self.tree.T, expanded=expanded, collapsed=collapsed))

    def _maintain(self):
        """After growth: refocus when due or when the WC exceeds W."""
        if self.n_entries > self.cfg.wc_budget:
            self.stats["budget_fits"] += 1
            self.refocus()
        elif self._since_refocus >= self.refocus_interval:
            self.refocus()

    def _append(self, ids):
        for s in range(0, ids.numel(), self.append_chunk):
            self._extend(ids[s:s + self.append_chunk])
            self._maintain()

    @torch.no_grad()
    def append(self, ids):
        """Append token ids (list or 1-D tensor, any length) to the history."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(-1)
        if ids.numel() == 0:
            return
        vocab = self.model.config.vocab_size
        if bool((ids.min() < 0) | (ids.max() >= vocab)):
            raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocabulary)")
        t0 = time.perf_counter()
        with self._amp():
            self._append(ids)
        self.stats["append_tokens"] += ids.numel()
        self.stats["append_seconds"] += time.perf_counter() - t0

    def _focus_map(self, tail_tokens: int, lookback: int):
        """`MCController.focus` with LensNet scoring afresh only the blocks of the last `lookback` tokens (older
        blocks keep the score of the last refocus that scored them), the context it opens leaving room for the rest
        of the partial block (`focus_maps`' reserve). Returns the map [n]."""
        tree, K, n = self.tree, self.cfg.block_size, self.n_blocks
        first = max(0, boundary(n, self.cfg) - lookback // K)  # first block LensNet scores
        levels = [tree.lod0(first * K, tree.T), tree.gists[0][:, first:n]]  # the history from that block on
        self._scores[first:n] = self.controller.block_scores(levels)[0].float()  # -inf on the raw tail
        return self.controller.select(self._scores[:n][None], tail_tokens, reserve=K - 1 - tail_tokens)[0]

    @torch.no_grad()
    def refocus(self, lookback: int | None = None) -> bool:
        """Decide the focus afresh (`MCController.focus`: LensNet's best blocks of the history expanded, with
        the nodes above them, within W), LensNet scoring the blocks of the last `lookback` tokens (default: the
        session's; a chat passes the whole history once a question is in). Returns whether the map changed."""
        self._since_refocus = 0
        cfg, K = self.cfg, self.cfg.block_size
        t = self.tree.T % K
        with self._amp():
            if self.n_blocks > cfg.recent // K:  # something outside the raw tail to focus on
                self.stats["refocus"] += 1
                maps = self._focus_map(t, self.lookback if lookback is None else lookback)
            else:
                maps = most_compressed_map(self.n_blocks, cfg, tail_tokens=t, device=self.device)  # [n]
            return self._set_map(maps, "refocus")

    # ---- decoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self):
        """Next-token logits [vocab] (fp32) after the current history; reuses the KV cache up to the first changed entry."""
        E = self.n_entries
        if E == 0:
            raise ValueError("the session is empty: append a prompt (starting with the BOS token) first")
        if self._logits is not None and self._valid == E:
            return self._logits
        start = min(self._valid, E - 1)
        self.cache.truncate(start)
        T = self.tree.T
        rope = (self._cos[:, start:E], self._sin[:, start:E])
        with self._amp():
            if E - start == 1:  # the last entry is always the newest token: the GPT embeds it as the tree does
                out = self.model(self.tree.ids[:, T - 1:T], rope=rope, kv_cache=self.cache, logits_to_keep=1)
            else:
                embeds = self._entry_embeds(self._pos[start:E], self._lod[start:E])[None]  # [1, m, D]
                token_ids = entry_token_ids(self._pos[None, start:E], self._lod[None, start:E], self.tree.token_ids)
                out = self.model(inputs_embeds=embeds, token_ids=token_ids, rope=rope, kv_cache=self.cache,
                                 logits_to_keep=1)
        self._logits = out[0, -1].float()
        self._valid = E
        st = self.stats
        st["forwards"] += 1
        st["prefills"] += int(E - start > 1)
        st["kv_reused"] += start
        st["kv_computed"] += E - start
        return self._logits

    def step(self, token: int):
        """Append one token and return the next-token logits [vocab]."""
        t0 = time.perf_counter()
        self.append([token])
        logits = self.logits()
        self.stats["decode_tokens"] += 1
        self.stats["decode_seconds"] += time.perf_counter() - t0
        return logits

    @torch.no_grad()
    def generate(self, max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 stop_tokens=()):
        """Yield up to max_tokens sampled token ids, one at a time; each joins the history before it is
        yielded. Stops after yielding a stop token (which stays in the history)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stop = set(stop_tokens)
        for _ in range(max_tokens):
            t0 = time.perf_counter()
            logits = self.logits()
            next_id = sample_next_token(logits[None], generator, temperature, top_k)  # [1]
            token = int(next_id)
            with self._amp():
                self._append(next_id)
            self.stats["decode_tokens"] += 1
            self.stats["decode_seconds"] += time.perf_counter() - t0
            yield token
            if token in stop:
                return

    @torch.no_grad()
    def recompute_logits(self):
        """Reference next-token logits [vocab]: materialise the WC afresh and run a full forward, no cache."""
        wc = materialize(self.lod_map[None], self.tree.levels(), self.tree.token_ids, self.cfg)
        with self._amp():
            out = self.model(inputs_embeds=wc.embeds, token_ids=entry_token_ids(wc.pos, wc.lod, self.tree.token_ids, wc.valid),
                             rope=self.controller.rope(wc, torch.tensor([self._frame], device=self.device)))
        return out[0, int(wc.n_entries[0]) - 1].float()

    # ---- inspection ----------------------------------------------------------------------------

    def state(self) -> dict:
        """Plain-Python snapshot for /stats, the focus map and tests."""
        K, T, st = self.cfg.block_size, self.tree.T, self.stats
        pos, lod = self.entries()
        per_lod = torch.bincount(lod, minlength=3).tolist()  # entries per level
        shown = self.lod_map.long()
        covered = (torch.bincount(shown[shown >= 0], minlength=len(per_lod)) * K).tolist()  # tokens per level
        covered[0] += T % K
        uncovered = int((self.lod_map == UNCOVERED).sum()) * K
        computed = st["kv_computed"]
        return dict(
            history_tokens=T, wc_entries=self.n_entries, wc_budget=self.cfg.wc_budget, block_size=K,
            recent=self.cfg.recent, tail_tokens=T % K, max_lod=self.cfg.max_lod,
            lod_mix=dict(raw=per_lod[0], **{f"lod{level}": c for level, c in enumerate(per_lod[1:], start=1)}),
            spans=dict(raw=covered[0], **{f"lod{level}": c for level, c in enumerate(covered[1:], start=1)},
                       uncovered=uncovered),
            lod_map=self.lod_map.tolist(), entry_pos=pos.tolist(), entry_lod=lod.tolist(),
            refocus_count=st["refocus"], budget_fits=st["budget_fits"], map_changes=st["map_changes"],
            refocus_interval=self.refocus_interval, since_refocus=self._since_refocus,
            decode_tokens=st["decode_tokens"],
            decode_tokens_per_s=st["decode_tokens"] / st["decode_seconds"] if st["decode_seconds"] else 0.0,
            append_tokens_per_s=st["append_tokens"] / st["append_seconds"] if st["append_seconds"] else 0.0,
            kv=dict(cached=self._valid, forwards=st["forwards"], prefills=st["prefills"], reused=st["kv_reused"],
                    computed=computed, reuse_fraction=st["kv_reused"] / max(st["kv_reused"] + computed, 1)),
            edits=list(self.edits), tokenizer=self.tokenizer_id,
        )

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path):
        """Write the session to `path` atomically (temp file + os.replace)."""
        tree = self.tree
        state = {
            "format": FORMAT, "version": FORMAT_VERSION, "mc_config": asdict(self.cfg),
            "model_config": asdict(self.model.config), "model_hash": config_hash(self.model.config),
            "weights": weights_fingerprint(self.controller), "tokenizer": self.tokenizer_id,
            "num_tokens": tree.T, "ids": tree.token_ids.cpu().clone(),  # clones: a view would save its whole buffer
            "gists": [g[:, :tree.num_nodes(l)].cpu().clone() for l, g in enumerate(tree.gists, start=1)],
            "partial_gists": tree.partial[1].cpu().clone(),  # [1, P, D] of the nodes mc.tree.partial_nodes lists
            "lod_map": self.lod_map.cpu().clone(), "scores": self._scores[:self.n_blocks].cpu().clone(),
            "session": dict(refocus_interval=self.refocus_interval, since_refocus=self._since_refocus, frame=self._frame,
                            stats=dict(self.stats), edits=list(self.edits)),
        }
        state["sha256"] = content_digest(state)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(os.fspath(path), buffer.getvalue())

    @classmethod
    def load(cls, path, controller, *, tokenizer_id: str | None = None, refocus_interval: int | None = None,
             check_weights: bool = True, **kwargs) -> "MCSession":
        """Continue a saved session with `controller` (same model, MCConfig and tokenizer); ValueError if incompatible."""
        path = os.fspath(path)
        state = read_session_file(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} is not a MegaContext session file (no '{FORMAT}' marker; it looks like a model "
                             "checkpoint or other file)")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is a session of format version {state.get('version')} (trees capped at LOD2); "
                             f"this code reads version {FORMAT_VERSION}: start a new session")
        digest = state.pop("sha256", None)  # files saved before digests were recorded have none
        if digest is not None and content_digest(state) != digest:
            raise ValueError(f"{path} has changed since it was saved (its content digest differs): it is corrupt")
        model, cfg = controller.model, controller.cfg
        if state.get("tokenizer") != tokenizer_id:
            raise ValueError(f"{path} was saved with tokenizer {state.get('tokenizer')!r}, "
                             f"but this session uses tokenizer {tokenizer_id!r}: token ids would mean different text")
        if state.get("model_hash") != config_hash(model.config):
            saved = state.get("model_config") or {}
            raise ValueError(f"{path} was saved for another model (width {saved.get('n_embd')}, depth "
                             f"{saved.get('n_layer')}, config hash {state.get('model_hash')}); this model has width "
                             f"{model.config.n_embd}, depth {model.config.n_layer}, hash {config_hash(model.config)}")
        saved = {**LEGACY_MC_CONFIG, **state["mc_config"]} if isinstance(state.get("mc_config"), dict) else {}
        if saved != asdict(cfg):
            diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in asdict(cfg).items() if saved.get(k) != v]
            raise ValueError(f"{path} was saved with another MegaContext config: {', '.join(diff) or 'unknown fields'}")
        if check_weights and state.get("weights") != weights_fingerprint(controller):
            raise ValueError(f"{path} holds gists made by other weights (embedding/GistNet fingerprint "
                             f"{state.get('weights')}, this model {weights_fingerprint(controller)}); "
                             "load it with the checkpoint that saved it")
        K, W, D = cfg.block_size, cfg.wc_budget, model.config.n_embd
        try:
            T, ids, gists, partial, lod_map, scores, extra = (state[k] for k in (
                "num_tokens", "ids", "gists", "partial_gists", "lod_map", "scores", "session"))
            n = T // K
            depth = max([1] + [l for l in range(1, max_level(n, K) + 1) if T // K ** l])  # levels of complete nodes
            ok = (ids.shape == (1, T) and ids.dtype == torch.long and len(gists) == depth
                  and all(g.shape == (1, T // K ** l, D) for l, g in enumerate(gists, start=1))
                  and partial.shape == (1, len(partial_nodes(n, cfg)), D)
                  and lod_map.shape == (n,) and lod_map.dtype == torch.int8 and scores.shape == (n,))
            ok = ok and (T == 0 or 0 <= int(ids.min()) and int(ids.max()) < model.config.vocab_size)
            ok = ok and bool(is_legal(lod_map[None], K, cfg.recent // K, partial=cfg.partial_gists)[0])
            ok = ok and int(entry_counts(lod_map[None], K, T % K)[0]) <= W
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is an incomplete MegaContext session file ({type(e).__name__}: {e})") from None
        if not ok:
            raise ValueError(f"{path} holds inconsistent MegaContext session tensors (T={T}, K={K}, W={W}, D={D})")
        interval = refocus_interval or extra.get("refocus_interval", DEFAULT_REFOCUS_INTERVAL)
        session = cls(controller, refocus_interval=interval, tokenizer_id=tokenizer_id, capacity=T, **kwargs)
        tree, device = session.tree, session.device
        with torch.no_grad():
            tree.ids[:, :T] = ids.to(device)
            for s in range(0, T if tree.lod0_cache is not None else 0, 65536):  # exact re-embedding, in slices
                e = min(T, s + 65536)
                tree.lod0_cache[:, s:e] = model.transformer.wte(tree.ids[:, s:e]).to(tree.dtype)
            tree.gists = [g.to(device, tree.dtype).clone() for g in gists]
            tree.partial = (partial_nodes(n, cfg), partial.to(device, tree.dtype))
            tree.T = T
            session._map = lod_map.to(device).clone()
            session._scores = scores.to(device, torch.float).clone()
            session.n_blocks = n
            session._set_map(session.lod_map.clone(), None, extra.get("frame"))
        session._since_refocus = int(extra.get("since_refocus", 0))
        session.stats.update({k: v for k, v in extra.get("stats", {}).items() if k in session.stats})
        session.edits.extend(extra.get("edits", []))
        return session
