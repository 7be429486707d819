"""MemoryRehearsal: the chat stages (mid, SFT) of a MegaContext checkpoint keep training it through working contexts.

Mid-training and SFT fine-tune the GPT on conversations that fit its context: alone they never show it a working
context, never train GistNet or LensNet, and move the token embedding that both read. With --mc_memory_rows=n
each chat step also takes n memory rows through MCController.process_batch, the step of base_train --mc: a memory
conversation (nanochat.memory_chat) rendered in the chat format and right-aligned after book filler in a row of
the model's context, its answer turn at the row end (nanochat.longrange), the answers weighted 5 and the filler
1 as in run10.sh's MC phase. The GPT, GistNet and LensNet all learn from it; the nets are saved with the stage.

Measured from r34's MC checkpoint (docs/architecture.md §11; chat_eval: 50 memory conversations at ~9W, 200
longdoc_qa documents): without it chat memory .32 (the value shown raw at the question .42), longdoc_qa .265;
with 2 rows per step chat memory .48 (raw .64) but longdoc_qa .155 and SFT val loss .1056 against .0903; with the
LM loss on the answers alone .38 and .155; training only GistNet and LensNet on the rows (the GPT untouched)
keeps longdoc_qa (.250) and gains no memory (.28, raw .34). Hence off by default: a trade, not a fix.
"""

from nanochat.dataset import prepare
from nanochat.longrange import MEMORY_MIN_ROW, MixedLoader, target_weights

from mc.build import load_controller


class MemoryRehearsal:
    """Memory rows through working contexts, one micro-batch per chat step; resumable (`state_dict`)."""

    def __init__(self, model, states: dict, meta: dict, rows: int, data: str, text_column: str, tokenizer,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu"):
        if model.config.sequence_len + 1 < MEMORY_MIN_ROW:
            raise ValueError(f"memory rows need a context of >= {MEMORY_MIN_ROW - 1} tokens, this model's is "
                             f"{model.config.sequence_len}: give --mc_memory_rows=0")
        self.controller = load_controller(model, states, meta, rank)
        self.rows = rows
        data_dir = prepare(data, text_column)  # book filler before the conversation and in its passages
        self.loader = MixedLoader(tokenizer, rows, model.config.sequence_len, data_dir, {"memory": 1.0},
                                  seed=seed, rank=rank, world_size=world_size, device=device,
                                  block_size=self.controller.cfg.block_size)

    def modules(self) -> dict:
        """The nets this trains (saved next to the GPT): {"mc_gist": GistNet, "mc_lens": LensNet}."""
        return self.controller.modules()

    def optimizer_split(self) -> tuple[list, list]:
        """(nets whose matrices Muon trains, nets AdamW trains whole), as base_train --mc trains them."""
        return self.controller.optimizer_split()

    def describe(self) -> str:
        cfg = self.controller.cfg
        return (f"{self.rows} memory rows per step through {1 + cfg.num_variants} working contexts each "
                f"(W={cfg.wc_budget}; GPT, GistNet and LensNet trained; answers weighted 5)")

    def step(self, step: int):
        """(loss, metrics) of the next micro-batch of memory rows: LM loss over the targets of the working contexts
        plus LensNet's and GistNet's losses (mc.runtime.MCController.process_batch). Call it under autocast."""
        x, y, answers = next(self.loader)
        weights = target_weights(answers, answer_weight=5.0)  # as base_train --mc's rows in run10.sh
        return self.controller.process_batch(x, y, step, answers=answers, weights=weights)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict):
        self.loader.load_state_dict(state)
