"""Chat with a trained model in the terminal.

    uv run python -m scripts.chat_cli                          # interactive, the latest SFT checkpoint
    uv run python -m scripts.chat_cli --prompt "Who are you?"  # one question, one streamed answer
    echo "Who are you?" | uv run python -m scripts.chat_cli --prompt -     # the prompt from stdin
    printf 'Hi\\nWho made you?\\n' | uv run python -m scripts.chat_cli  # piped: every line is a user turn

Commands in a conversation: /clear starts a new one, /quit leaves (as does Ctrl-D). Replies stream to
stdout token by token; everything else (loading, warnings) goes to stderr, so one-shot answers can
be piped. The conversation must fit the model's context (`sequence_len`); when it no longer does,
the CLI says so and waits for /clear.

The conversation lives in a `Conversation` object with two methods, `clear()` and
`reply(text) -> stream of text pieces`; another kind of session (e.g. one with an unbounded
history) can take its place without touching the loop.
"""

import argparse
import sys

from nanochat.checkpoint import CheckpointError, load_model_and_tokenizer
from nanochat.common import autocast_ctx, autocast_dtype, compute_init
from nanochat.engine import Engine

COMMANDS = "/clear starts a new conversation, /quit leaves"


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
        self.cut = False  # the last reply stopped at the context limit

    def clear(self):
        self.messages, self.cut = [], False

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
        reply_ids, shown = [], 0
        for column in self.engine.generate(prompt, max_tokens=min(self.max_tokens, room), temperature=self.temperature,
                                           top_k=self.top_k, seed=self.seed + len(self.messages)):
            if column[0] in self.stop_tokens:
                break
            reply_ids.append(column[0])
            text = self.tokenizer.decode(reply_ids)
            if not text.endswith("\ufffd"):  # hold back a multi-byte character until it is complete
                yield text[shown:]
                shown = len(text)
        text = self.tokenizer.decode(reply_ids)
        if len(text) > shown:
            yield text[shown:]
        self.cut = len(reply_ids) == room
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
        print(f"(the reply stopped at the model's context of {conversation.context} tokens; /clear to start over)",
              file=sys.stderr, flush=True)
    return True


def chat_loop(conversation, lines, interactive: bool):
    """One user turn per line of input; /clear and /quit are commands."""
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
            print(f"unknown command {text.split()[0]}: {COMMANDS}", file=sys.stderr, flush=True)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft"], help="which stage's checkpoint to chat with")
    parser.add_argument("--tag", default="", help="checkpoint tag (default: the most recently written)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit ('-' reads it from stdin)")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--max_tokens", type=int, default=256, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    args = parser.parse_args(argv)

    _, _, _, _, device = compute_init(args.device_type)
    try:
        model, tokenizer, meta, ckpt_dir = load_model_and_tokenizer(args.source, args.tag, args.step, device)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    amp_dtype = autocast_dtype(device.type)
    engine = Engine(model, autocast=lambda: autocast_ctx(device.type, amp_dtype))
    context = model.config.sequence_len
    conversation = Conversation(engine, tokenizer, context, args.temperature, args.top_k or None, args.max_tokens,
                                args.seed)
    print(f"{args.source} checkpoint {ckpt_dir} step {meta['step']}, context {context} tokens, device {device}",
          file=sys.stderr, flush=True)

    try:
        if args.prompt is not None:
            prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
            if not prompt.strip():
                sys.exit("error: the prompt is empty")
            if not say(conversation, prompt.strip()):
                sys.exit(1)
        elif sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())
            print(f"Chatting with MegaContext-nano. {COMMANDS}.", file=sys.stderr, flush=True)
            chat_loop(conversation, input_lines(), interactive=True)
        else:
            chat_loop(conversation, sys.stdin, interactive=False)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
