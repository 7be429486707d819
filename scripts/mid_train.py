"""Mid-training: teach a base model the chat format and long-document QA, with a mix close to pretraining.

    python -m scripts.mid_train                          # from the most recent base checkpoint
    python -m scripts.mid_train --source_tag=d4 --num_iterations=100
    torchrun --nproc_per_node=8 -m scripts.mid_train

Conversations are packed best-fit into full rows of the model's context (each row starts at a
conversation's BOS; no conversation is cut, too-long ones are dropped and counted); the loss is on
assistant tokens only. The model config comes from the source checkpoint. Checkpoints go to
checkpoints/mid/<tag> (default: the source's tag) and --resume continues exactly. The shared
procedure is nanochat/chat_train.py (with --mc_memory_rows, each step of a MegaContext checkpoint also trains
its GPT, GistNet and LensNet on memory rows through working contexts: mc/rehearsal.py); this file holds the mid-training defaults.
"""

import argparse
from dataclasses import dataclass, field

from mc.rehearsal import MemoryRehearsal
from nanochat.chat_train import ChatTrainConfig
from nanochat.chat_train import main as run
from nanochat.configurator import FlagParser, add_dataclass_args, dataclass_from_args


@dataclass
class MidConfig(ChatTrainConfig):
    source: str = field(default="base", metadata={"help": "stage of the checkpoint to start from", "choices": ["base", "mid"]})
    data: str = field(default="smoltalk:4,longdoc_qa:2,identity:0.5", metadata={"help": "conversation mix (hub sources are skipped offline; see nanochat/chat_data.py)"})
    num_conversations: int = field(default=200_000, metadata={"min": 1, "help": "training conversations drawn from the mix"})
    num_iterations: int = field(default=500, metadata={"min": 1, "help": "optimizer steps"})
    rows_per_step: int = field(default=256, metadata={"min": 1, "help": "rows (of the full context) per optimizer step over all ranks and micro-batches"})
    device_batch_size: int = field(default=32, metadata={"min": 1, "help": "rows per forward pass on each rank"})
    init_lr_frac: float = field(default=1.0, metadata={"min": 0, "help": "scale of all the learning rates (1 = the pretraining ones)"})
    warmdown_ratio: float = field(default=0.5, metadata={"min": 0, "help": "fraction of final steps of linear LR decay"})


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, MidConfig, title="mid-training")
    cfg = dataclass_from_args(MidConfig, parser.parse_args(argv))
    return run(cfg, stage="mid", pack=True, report_stage="mid-train", title="Mid-training", rehearsal=MemoryRehearsal)


if __name__ == "__main__":
    main()
