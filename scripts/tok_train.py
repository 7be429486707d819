"""Train the BPE tokenizer on the pretraining text and save it to <base_dir>/tokenizer.

    uv run python -m scripts.tok_train --vocab_size=4096 --max_chars=2e9
"""

import argparse
import time


from nanochat import report
from nanochat.common import get_base_dir
from nanochat.configurator import FlagParser, checked_number
from nanochat.progress import bar
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer


def capped_text(documents, max_chars: int, doc_cap: int, read: dict):
    """Yield documents in pieces of at most doc_cap characters, until max_chars characters in total;
    `read` counts the characters and documents read so far (for the report)."""
    read.update(chars=0, docs=0)
    with bar(total=max_chars, unit="char", unit_scale=True, desc="training text") as progress:
        for doc in documents:
            read["docs"] += 1
            for start in range(0, len(doc), doc_cap):
                piece = doc[start:start + doc_cap]
                read["chars"] += len(piece)
                progress.update(len(piece))
                yield piece
                if read["chars"] >= max_chars:
                    return


def main(argv=None):
    parser = FlagParser(description="Train the BPE tokenizer (rustbpe) and save it for tiktoken.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vocab_size", type=checked_number(int, 1), default=4096, help="total vocabulary, special tokens included")
    parser.add_argument("--max_chars", type=checked_number(float, 1), default=2e9, help="total characters of training text to read (scientific notation ok)")
    parser.add_argument("--doc_cap", type=checked_number(int, 1), default=10_000, help="long documents are fed to the trainer in pieces of at most this many characters")
    parser.add_argument("--data", type=str, default="books", help="dataset source passed to nanochat.dataset.prepare")
    parser.add_argument("--text_column", type=str, default="text", help="with a directory --data: the .jsonl field / .parquet column holding the documents")
    args = parser.parse_args(argv)
    max_chars = int(args.max_chars)

    from nanochat import dataset  # imported here so --help works before the data module is in place
    try:
        data_dir = dataset.prepare(args.data, args.text_column)
    except (dataset.DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    read = {}
    text = capped_text(dataset.iter_documents(data_dir, split="train"), max_chars, args.doc_cap, read)

    t0 = time.time()
    try:
        tokenizer = Tokenizer.train_from_iterator(text, args.vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    train_time = time.time() - t0
    print(f"trained vocab_size={tokenizer.vocab_size} in {train_time:.1f}s")

    out_dir = get_base_dir() / "tokenizer"
    tokenizer.save(out_dir)
    print(f"saved to {out_dir} (identity {tokenizer.identity()})")

    samples = [
        "Hello world! It was the best of times, it was the worst of times.",
        "def add(a, b):\n    return a + b  # 12345",
        "Naïve café — 你好 🙂",
    ]
    lines = []
    for sample in samples:
        ids = tokenizer.encode(sample, prepend="<|bos|>")
        pieces = [tokenizer.id_to_token(i) for i in ids]
        lines.append(f"{len(sample.encode('utf-8'))} bytes -> {len(ids) - 1} tokens: {pieces}")
        print(lines[-1])

    report.log_section("tokenizer", "Tokenizer training", [
        {"data": args.data, "vocab size": f"{tokenizer.vocab_size:,} ({len(SPECIAL_TOKENS)} special tokens)",
         "training text": f"{read['chars']:,} characters from {read['docs']:,} documents (--max_chars={max_chars:,}, "
                          f"--doc_cap={args.doc_cap:,})",
         "training time": f"{train_time:.1f} s", "identity": tokenizer.identity(), "saved to": str(out_dir)},
        "Samples:", *[f"    {line}" for line in lines],
    ])


if __name__ == "__main__":
    main()
