"""MCConfig: every MegaContext setting, in one place.

`scripts/base_train.py --mc` exposes each field as `--mc_<field>` (see nanochat/configurator.py);
recipes pass flags and never repeat these defaults. `validate` rejects impossible values and
contradictory combinations at start-up, naming the flag.

Terms: K = block size (tokens per LOD1 gist, LOD1 gists per LOD2 gist), W = working-context
budget in entries, R = raw tail kept as tokens, H = the last H targets shared by all variants of
a sequence (where counterfactual NLLs are compared).
"""

from dataclasses import dataclass, field

from mc.positional import check_mode


RECENCY_BONUS = 3.0  # MCConfig.recency_bonus

# settings of checkpoints and sessions saved before the field existed; read_on and recency_bonus change no training
# (only the inference focus), so what was saved before them gets them as the current default and still resumes and loads
LEGACY_MC_CONFIG = {"bag_loss_weight": 0.0, "lens_match": False, "max_distance": 0, "partial_gists": False,
                    "gist_mlp_ratio": 4, "gist_optimizer": "muon", "read_on": True, "recency_bonus": RECENCY_BONUS}


class MCConfigError(ValueError):
    """An invalid MegaContext setting; the message names the --mc_ flag."""


@dataclass
class MCConfig:
    # tree and working context
    block_size: int = field(default=32, metadata={"help": "K: tokens per LOD1 gist and LOD1 gists per LOD2 gist"})
    max_lod: int = field(default=2, metadata={"help": "levels of detail with their own learned embedding in GistNet and LensNet; the tree grows as deep as the history needs and deeper levels share the embedding of this one", "choices": [1, 2, 3, 4]})
    partial_gists: bool = field(default=True, metadata={"help": "show an incomplete group of the tree (older than the raw tail) as one gist of its complete children (GistNet with masked padding), in training, evaluation and sessions: a history older than the raw tail then needs one entry per non-zero base-K digit of its blocks (off: the group's children, up to K-1 entries per level, so a long enough session drops its oldest history: the recipe's model without them, from 163,871 tokens; with them, nothing up to 200,000)"})
    wc_budget: int = field(default=512, metadata={"help": "W: entries (tokens + gists) in a working context"})
    recent: int = field(default=128, metadata={"help": "R: most recent tokens always kept raw (LOD0)"})
    horizon: int = field(default=64, metadata={"help": "H: final targets shared by all variants, scored for LensNet"})
    num_variants: int = field(default=3, metadata={"help": "N: compressed working contexts per sequence (besides the truncation baseline)"})
    teacher_variants: int = field(default=1, metadata={"help": "of the N variants, how many the lexical-overlap teacher focuses (training exploration; see mc/runtime.py)"})
    # GistNet
    gist_type: str = field(default="transformer", metadata={"help": "GistNet body", "choices": ["transformer", "mean"]})
    gist_layers: int = field(default=1, metadata={"help": "bidirectional transformer layers of GistNet (CPU preset, MC and focus phases from one checkpoint: 1 layer vs 2, needle at 2W-16W .885/.895/.88/.745 vs .85/.83/.845/.75, natural-text tail NLL .01-.03 nats worse, val bpb 1.768 vs 1.764; a fresh-clone run10 with 1: .82/.845/.825/.675; bench_mc MC step 1.22x plain vs 1.36x)"})
    gist_mlp_ratio: int = field(default=2, metadata={"help": "hidden width of GistNet's MLP in multiples of the model width (with --mc_gist_optimizer=adamw, 2 rather than 4 took bench_mc's MC step from 1.16x to 1.05-1.06x plain, one thread; the recipe's MC and focus phases from one checkpoint kept needle and natural text: docs/architecture.md §12)"})
    gist_pooling: str = field(default="query", metadata={"help": "how GistNet pools a block", "choices": ["mean", "query", "cls"]})
    gist_head: str = field(default="mlp", metadata={"help": "GistNet output head", "choices": ["linear", "mlp"]})
    # LensNet
    lens_layers: int = field(default=2, metadata={"help": "LensNet transformer layers"})
    lens_width: int = field(default=128, metadata={"help": "LensNet hidden width"})
    lens_match: bool = field(default=True, metadata={"help": "LensNet adds to each block's score a learned token-level match of the block's tokens (those older than the question) with the question (the last R tokens before the focus is decided; mc/lensnet.py): a rare key that one gist of K tokens loses is matched directly. In the CPU recipe it took needle mc at 2W-16W from .84-.875 to .92-.955 with natural text below the plain twin's truncation at every length (docs/architecture.md §5); --no-mc_lens_match turns it off"})
    # focus allocator
    allocator: str = field(default="stochastic_greedy", metadata={"help": "training-time allocator policy", "choices": ["greedy", "stochastic_greedy"]})
    expand_threshold: float = field(default=float("-inf"), metadata={"help": "expand a gist only if its score exceeds this (-inf: spend the budget on the best-scored gists; LensNet's scores are relative, it is trained with a softmax over them)"})
    collapse_threshold: float = field(default=0.0, metadata={"help": "collapse a group only if its score is below minus this"})
    max_edits: int = field(default=8, metadata={"help": "most expansions/collapses per refocus iteration"})
    allocator_iterations: int = field(default=2, metadata={"help": "refocus iterations (LensNet re-scores in between)"})
    read_on: bool = field(default=True, metadata={"help": "inference focus (mc arm, sessions): every block LensNet ranks brings the block after it right behind it in the ranking, since a passage continues past the words that match the question (a fact's value follows its key; a needle across a block boundary was found but cut off: CPU preset at 8W, mc .77 -> .90 on 400 needles; it costs recall rows that need several separate blocks, 2 pairs .80 -> .56)"})
    recency_bonus: float = field(default=RECENCY_BONUS, metadata={"help": "inference focus (mc arm, sessions): added to LensNet's score of the block right before the raw tail, so that block is shown raw unless LensNet rates another one more than e^bonus times likelier to be worth expanding (its scores are softmax logits); text with no question in it then reads on from recent words instead of from a far block (CPU preset, 96 natural-text rows, 2W..16W: tail NLL 4.27/4.28/4.26/4.29 -> 4.21/4.21/4.22/4.23 at 3, needle .865/.825/.85/.76 -> .85/.83/.845/.75; 0 = off)"})
    top_k: int = field(default=8, metadata={"help": "stochastic_greedy samples among the top-k candidates"})
    temperature: float = field(default=1.0, metadata={"help": "stochastic_greedy sampling temperature"})
    # positions, precision, losses, memory
    positional: str = field(default="gaussian", metadata={"help": "rotary positions of gists", "choices": ["gaussian", "index"]})
    max_distance: int = field(default=0, metadata={"help": "rotary distances in a working context stay below this (older positions are compressed, see mc/positional.py); 0 = the GPT's --max_seq_len. Set it to the length the GPT was trained at when a phase with the GPT frozen trains on longer histories"})
    aux_dtype: str = field(default="auto", metadata={"help": "dtype of GistNet/LensNet (auto = follow the model)", "choices": ["auto", "fp32", "bf16"]})
    gist_optimizer: str = field(default="adamw", metadata={"help": "optimizer of GistNet's matrices: adamw, or muon as the GPT's and LensNet's (whose Newton-Schulz iterations over GistNet's matrices cost ~45 ms of a ~1 s CPU-preset step; LensNet on AdamW too cost natural text .01-.02 nats in a probe: docs/architecture.md §12)", "choices": ["adamw", "muon"]})
    lens_loss_weight: float = field(default=0.1, metadata={"help": "weight of the LensNet loss"})
    bag_loss_weight: float = field(default=0.0, metadata={"help": "weight of GistNet's bag-of-tokens loss: every gist predicts the tokens it covers through a linear head, so gists keep the identity of rare tokens (keys) that LensNet matches against the question (0 = off, no head)"})
    baseline_loss_weight: float = field(default=1.0, metadata={"help": "weight of the truncation baseline in the LM loss"})
    cache_lod0: bool = field(default=False, metadata={"help": "sessions keep every token's embedding (LOD0) instead of re-embedding the few they read; measured at 1,000,000 tokens (bench_infer, CPU preset): decode and append as fast either way, 1,116 vs 43 bytes per history token"})
    seed: int = field(default=0, metadata={"help": "seed of variant sampling"})

    def validate(self, sequence_len: int | None = None, head_dim: int | None = None):
        """Raise MCConfigError for impossible settings (sequence_len/head_dim: of the model, when known)."""
        def fail(msg):
            raise MCConfigError(msg)
        K = self.block_size
        if K < 2 or K & (K - 1):
            fail(f"--mc_block_size={K} must be a power of two >= 2")
        if self.wc_budget < 2 * K:
            fail(f"--mc_wc_budget={self.wc_budget} must be at least 2 x --mc_block_size={K}")
        if self.recent < 1 or self.recent % K:
            fail(f"--mc_recent={self.recent} must be a positive multiple of --mc_block_size={K}")
        if self.wc_budget < self.recent:
            fail(f"--mc_wc_budget={self.wc_budget} is smaller than --mc_recent={self.recent}")
        if self.wc_budget == self.recent:
            fail(f"--mc_wc_budget={self.wc_budget} equals --mc_recent: no room left for gists")
        if self.wc_budget < self.recent + K - 1:
            fail(f"--mc_wc_budget={self.wc_budget} is below --mc_recent + --mc_block_size - 1 = {self.recent + K - 1}: a chat "
                 "session keeps the raw tail plus the tokens of its current block raw, so such a model could not chat")
        if not 1 <= self.horizon <= self.recent:
            fail(f"--mc_horizon={self.horizon} must lie in [1, --mc_recent={self.recent}]")
        if self.num_variants < 1:
            fail(f"--mc_num_variants={self.num_variants} must be >= 1")
        if not 0 <= self.teacher_variants <= self.num_variants:
            fail(f"--mc_teacher_variants={self.teacher_variants} must lie in [0, --mc_num_variants={self.num_variants}]")
        if self.gist_type == "transformer" and self.gist_layers < 1:
            fail(f"--mc_gist_layers={self.gist_layers} must be >= 1 for --mc_gist_type=transformer")
        if self.gist_mlp_ratio < 1:
            fail(f"--mc_gist_mlp_ratio={self.gist_mlp_ratio} must be >= 1")
        if self.lens_layers < 1 or self.lens_width < 8:
            fail("--mc_lens_layers must be >= 1 and --mc_lens_width >= 8")
        if self.max_edits < 1 or self.allocator_iterations < 1 or self.top_k < 1:
            fail("--mc_max_edits, --mc_allocator_iterations and --mc_top_k must be >= 1")
        if not 0 <= self.recency_bonus < float("inf"):
            fail(f"--mc_recency_bonus={self.recency_bonus} must be a finite number >= 0")
        if self.temperature <= 0:
            fail(f"--mc_temperature={self.temperature} must be > 0")
        if self.max_distance < 0 or 0 < self.max_distance < self.wc_budget:
            fail(f"--mc_max_distance={self.max_distance} must be 0 (the GPT's length) or at least --mc_wc_budget={self.wc_budget}")
        if self.lens_loss_weight < 0 or self.baseline_loss_weight < 0 or self.bag_loss_weight < 0:
            fail("loss weights (--mc_lens_loss_weight, --mc_baseline_loss_weight, --mc_bag_loss_weight) must be >= 0")
        if sequence_len is not None:
            if sequence_len % K:
                fail(f"--mc_block_size={K} does not divide the sequence length {sequence_len} (--max_seq_len)")
            if sequence_len <= self.wc_budget:
                fail(f"--max_seq_len={sequence_len} must exceed --mc_wc_budget={self.wc_budget}: "
                     "MegaContext trains on histories longer than the working context")
            if self.min_entries(sequence_len) > self.wc_budget:
                fail(f"a history of {sequence_len} tokens does not fit --mc_wc_budget={self.wc_budget} even fully "
                     f"compressed ({self.min_entries(sequence_len)} entries with --mc_recent={self.recent}); "
                     f"raise the budget{'' if self.partial_gists else ', drop --no-mc_partial_gists'} or shorten --max_seq_len")
        if self.num_variants < 2 and self.lens_loss_weight > 0:
            fail(f"--mc_num_variants={self.num_variants} leaves LensNet no pair of variants to compare (its loss "
                 "would always be 0): use >= 2, or --mc_lens_loss_weight=0")
        try:
            check_mode(self.positional, head_dim if head_dim is not None else 2)
        except ValueError as e:
            fail(f"--mc_positional={self.positional}: {e}")

    def rope_max_len(self, sequence_len: int) -> int:
        """Rotary distances stay below this (mc.positional.wc_rope's max_len)."""
        return self.max_distance or sequence_len

    def net_fields(self) -> dict:
        """The settings GistNet and LensNet are built and trained for: nets from a checkpoint whose other
        (training) settings differ still fit (base_train --init_from)."""
        names = ("block_size", "max_lod", "gist_type", "gist_layers", "gist_mlp_ratio", "gist_pooling", "gist_head", "lens_layers",
                 "lens_width", "lens_match", "positional", "aux_dtype")
        return {**{name: getattr(self, name) for name in names}, "bag_head": self.bag_loss_weight > 0}

    def min_entries(self, history_len: int) -> int:
        """Entries of the most compressed cover of `history_len` tokens that keeps R raw (history a multiple of K):
        per base-K digit of the older blocks, the digit (complete nodes) or, with partial gists, one entry
        (a single complete node, or a partial gist of several)."""
        K, older, entries = self.block_size, max(history_len - self.recent, 0) // self.block_size, 0
        while older:
            digit = older % K
            entries += min(digit, 1) if self.partial_gists else digit
            older //= K
        return entries + self.recent
