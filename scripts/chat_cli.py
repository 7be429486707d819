"""Chat with a trained model in the terminal.

    uv run python -m scripts.chat_cli                          # interactive, the latest SFT checkpoint
    uv run python -m scripts.chat_cli --prompt "Who are you?"  # one question, one streamed answer
    echo "Who are you?" | uv run python -m scripts.chat_cli --prompt -     # the prompt from stdin
    printf 'Hi\\nWho made you?\\n' | uv run python -m scripts.chat_cli  # piped: every line is a user turn
    uv run python -m scripts.chat_cli --mc                     # MegaContext: the history never runs out

Commands in a conversation: /clear starts a new one, /quit leaves (as does Ctrl-D). Replies stream to
stdout token by token; everything else (loading, warnings, command output) goes to stderr, so
one-shot answers can be piped. Without --mc the conversation must fit the model's context
(`sequence_len`); when it no longer does, the CLI says so and waits for /clear.

With --mc (a checkpoint trained with `base_train --mc`, or mid/SFT from one) the conversation is an
MCSession (mc/chat.py): every turn is appended to a history of any length, the model attends over
a working context of at most W entries, and LensNet chooses which old turns it sees in full. Extra
commands: /save FILE and /load FILE (the whole conversation, to continue later), /focus [FILE]
(which spans of history are raw, LOD1, LOD2, plus a focus-map PNG), /stats (history tokens, WC
size, refocus count, tokens/s).

A conversation object has `clear()` and `reply(text) -> stream of text pieces` (and `cut`, a note when
the last reply was cut short); the MC one adds the commands.
"""

import argparse
import sys

from mc.session import DEFAULT_REFOCUS_INTERVAL
from nanochat.checkpoint import CheckpointError, load_model_and_tokenizer
from nanochat.common import autocast_ctx, autocast_dtype, compute_init, get_report_dir
from nanochat.configurator import FlagParser, checked_number
from nanochat.engine import Engine, stream_text

COMMANDS = "/clear starts a new conversation, /quit leaves"
MC_COMMANDS = "/save FILE, /load FILE, /focus [FILE], /stats"


class ContextFull(Exception):
    """The conversation no longer fits the model's context; the message says what to do."""

    def __init__(self, n_tokens: int, limit: int):
        super().__init__(f"the conversation ({n_tokens} tokens) no longer fits the model's context of {limit} tokens; "
                         f"start a new one with /clear — MegaContext (--mc) removes this limit")


class Conversation:
    """A plain chat: every reply re-reads the whole conversation, which must fit the model's context."""

    def __init__(self, engine: Engine, tokenizer, context: int, temperature: float, top_k: int | None, max_tokens: int,
                 seed: int = 42):
        self.engine, self.tokenizer, self.context = engine, tokenizer, context
        self.temperature, self.top_k, self.max_tokens, self.seed = temperature, top_k, max_tokens, seed
        self.assistant_end = tokenizer.encode_special("<|assistant_end|>")
        self.stop_tokens = [self.assistant_end, tokenizer.bos_token_id]
        self.messages = []  # [{"role", "content"}], alternating user/assistant
        self.cut = ""  # why the last reply stopped early, if it did

    def clear(self):
        self.messages, self.cut = [], ""

    def reply(self, text: str):
        """Add a user turn; return a stream of the reply's text pieces as they are generated. Raises
        ContextFull (and leaves the conversation unchanged) when the prompt leaves no room for a reply."""
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self.tokenizer.render_for_completion(messages)
        room = self.context - len(prompt)
        if room < 1:
            raise ContextFull(len(prompt), self.context)
        self.messages = messages
        return self._stream(prompt, room)

    def _stream(self, prompt: list[int], room: int):
        columns = self.engine.generate(prompt, max_tokens=min(self.max_tokens, room), temperature=self.temperature,
                                       top_k=self.top_k, seed=self.seed + len(self.messages))
        reply_ids = []
        yield from stream_text(self.tokenizer, (column[0] for column in columns), self.stop_tokens, reply_ids)
        text = self.tokenizer.decode(reply_ids)
        self.cut = (f"(the reply stopped at the model's context of {self.context} tokens; /clear to start over)"
                    if len(reply_ids) == room else "")
        self.messages.append({"role": "assistant", "content": text.strip() or "..."})


def say(conversation, text: str, label: str = "") -> bool:
    """Stream the reply to `text` to stdout; False (and the reason on stderr) when the context is full."""
    try:
        pieces = conversation.reply(text)
    except ContextFull as e:
        print(e, file=sys.stderr, flush=True)
        return False
    print(label, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print(flush=True)
    if conversation.cut:
        print(conversation.cut, file=sys.stderr, flush=True)
    return True


def run_command(conversation, text: str) -> str:
    """Run an MC command line (/save, /load, /focus, /stats); returns what to show."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name not in ("/save", "/load", "/focus", "/stats"):
        return f"unknown command {name}: {COMMANDS}" + (f"; {MC_COMMANDS}" if hasattr(conversation, "stats") else "")
    if not hasattr(conversation, "stats"):
        return f"{name} needs MegaContext: start the chat with --mc"
    if name in ("/save", "/load") and not arg:
        return f"usage: {name} FILE"
    try:
        if name == "/save":
            return conversation.save(arg)
        if name == "/load":
            return conversation.load(arg)
        if name == "/focus":
            return conversation.focus(arg or get_report_dir() / "chat_focus.png")
        return conversation.stats()
    except (ValueError, OSError) as e:  # a foreign/corrupt/missing file: say so, keep the conversation
        return f"{name} failed: {e}"


def chat_loop(conversation, lines, interactive: bool):
    """One user turn per line of input; lines starting with / are commands."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/clear":
            conversation.clear()
            print("(new conversation)", file=sys.stderr, flush=True)
            continue
        if text.startswith("/"):
            print(run_command(conversation, text), file=sys.stderr, flush=True)
            continue
        say(conversation, text, "Assistant: " if interactive else "")
        if interactive:
            print()


def input_lines():
    """Lines typed at the terminal, until /quit or Ctrl-D."""
    while True:
        try:
            yield input("You: ")
        except EOFError:
            print()
            return


def run_chat(args, conversation):
    """Answer --prompt once, or chat with a terminal or a piped stdin."""
    if args.prompt is not None:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not prompt.strip():
            sys.exit("error: the prompt is empty")
        if not say(conversation, prompt.strip()):
            sys.exit(1)
    elif sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
        extra = f"; {MC_COMMANDS}" if args.mc else ""
        print(f"Chatting with MegaContext-nano. {COMMANDS}{extra}.", file=sys.stderr, flush=True)
        chat_loop(conversation, input_lines(), interactive=True)
    else:
        chat_loop(conversation, sys.stdin, interactive=False)


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint to chat with")
    parser.add_argument("--tag", default="", help="checkpoint tag (default: the most recently written)")
    parser.add_argument("--step", type=checked_number(int, 0), default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit ('-' reads it from stdin)")
    parser.add_argument("--temperature", type=checked_number(float, 0), default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top_k", type=checked_number(int, 0), default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--max_tokens", type=checked_number(int, 1), default=256, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    parser.add_argument("--mc", action="store_true", help="MegaContext: an unbounded history (needs a checkpoint with MC nets)")
    parser.add_argument("--refocus_interval", type=checked_number(int, 1), default=DEFAULT_REFOCUS_INTERVAL, help="with --mc: tokens between LensNet refocuses")
    parser.add_argument("--load", default=None, help="with --mc: start from a conversation saved by /save")
    args = parser.parse_args(argv)
    if (args.refocus_interval != DEFAULT_REFOCUS_INTERVAL or args.load) and not args.mc:
        parser.error("--refocus_interval and --load need --mc")

    _, _, _, _, device = compute_init(args.device_type)
    amp_dtype = autocast_dtype(device.type)
    autocast = lambda: autocast_ctx(device.type, amp_dtype)  # noqa: E731
    try:
        if args.mc:
            from mc.build import load_mc_model
            from mc.chat import MCConversation
            model, controller, tokenizer, meta, ckpt_dir = load_mc_model(args.source, args.tag, args.step, device)
            conversation = MCConversation(controller, tokenizer, args.temperature, args.top_k or None, args.max_tokens,
                                          args.seed, autocast, args.refocus_interval)
            if args.load:
                print(conversation.load(args.load), file=sys.stderr, flush=True)
            cfg = controller.cfg
            context = f"MegaContext: unbounded history, working context W={cfg.wc_budget} entries (K={cfg.block_size})"
        else:
            model, tokenizer, meta, ckpt_dir = load_model_and_tokenizer(args.source, args.tag, args.step, device)
            conversation = Conversation(Engine(model, autocast=autocast), tokenizer, model.config.sequence_len,
                                        args.temperature, args.top_k or None, args.max_tokens, args.seed)
            context = f"context {model.config.sequence_len} tokens"
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.source} checkpoint {ckpt_dir} step {meta['step']}, {context}, device {device}", file=sys.stderr, flush=True)

    try:
        with autocast():  # one region over the chat: weights cast once, not per token (nanochat/engine.py)
            run_chat(args, conversation)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
