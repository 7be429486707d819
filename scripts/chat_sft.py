"""Supervised fine-tuning (SFT): short training on single conversations, the last step before chat.

    python -m scripts.chat_sft                           # from the most recent mid checkpoint
    python -m scripts.chat_sft --source=base --source_tag=d4
    torchrun --nproc_per_node=8 -m scripts.chat_sft

One conversation per row, right-padded to the longest row of the batch (padding has target -1);
the loss is on assistant tokens only. Conversations longer than the model's context are dropped and
counted, never truncated. The model config comes from the source checkpoint. Checkpoints go to
checkpoints/sft/<tag> (default: the source's tag) and --resume continues exactly. The shared
procedure is nanochat/chat_train.py (with --mc_memory_rows, each step of a MegaContext checkpoint also trains
its GPT, GistNet and LensNet on memory rows through working contexts: mc/rehearsal.py); this file holds the SFT defaults.
"""

import argparse
from dataclasses import dataclass, field

from mc.rehearsal import MemoryRehearsal
from nanochat.chat_train import ChatTrainConfig
from nanochat.chat_train import main as run
from nanochat.configurator import FlagParser, add_dataclass_args, dataclass_from_args


@dataclass
class SFTConfig(ChatTrainConfig):
    source: str = field(default="mid", metadata={"help": "stage of the checkpoint to start from", "choices": ["base", "mid"]})
    data: str = field(default="smoltalk:4,gsm8k:1,longdoc_qa:1,identity:0.5", metadata={"help": "conversation mix (hub sources are skipped offline; see nanochat/chat_data.py)"})
    num_conversations: int = field(default=20_000, metadata={"min": 1, "help": "training conversations drawn from the mix"})
    num_iterations: int = field(default=600, metadata={"min": 1, "help": "optimizer steps"})
    rows_per_step: int = field(default=32, metadata={"min": 1, "help": "conversations per optimizer step over all ranks and micro-batches"})
    device_batch_size: int = field(default=8, metadata={"min": 1, "help": "conversations per forward pass on each rank"})
    init_lr_frac: float = field(default=0.1, metadata={"min": 0, "help": "scale of all the learning rates (1 = the pretraining ones)"})
    warmdown_ratio: float = field(default=1.0, metadata={"min": 0, "help": "fraction of final steps of linear LR decay"})


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, SFTConfig, title="SFT")
    cfg = dataclass_from_args(SFTConfig, parser.parse_args(argv))
    return run(cfg, stage="sft", pack=False, report_stage="chat-sft", title="Chat SFT", rehearsal=MemoryRehearsal)


if __name__ == "__main__":
    main()
