"""Train the BPE tokenizer on the pretraining text and save it to <base_dir>/tokenizer.

    uv run python -m scripts.tok_train --vocab_size=4096 --max_chars=2e9
"""

import argparse
import time

from tqdm import tqdm

from nanochat.common import get_base_dir
from nanochat.configurator import FlagParser, checked_number
from nanochat.tokenizer import Tokenizer


def capped_text(documents, max_chars: int, doc_cap: int):
    """Yield documents in pieces of at most doc_cap characters, until max_chars characters in total."""
    n_chars = 0
    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="training text") as progress:
        for doc in documents:
            for start in range(0, len(doc), doc_cap):
                piece = doc[start:start + doc_cap]
                n_chars += len(piece)
                progress.update(len(piece))
                yield piece
                if n_chars >= max_chars:
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
    text = capped_text(dataset.iter_documents(data_dir, split="train"), max_chars, args.doc_cap)

    t0 = time.time()
    try:
        tokenizer = Tokenizer.train_from_iterator(text, args.vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"trained vocab_size={tokenizer.vocab_size} in {time.time() - t0:.1f}s")

    out_dir = get_base_dir() / "tokenizer"
    tokenizer.save(out_dir)
    print(f"saved to {out_dir} (identity {tokenizer.identity()})")

    samples = [
        "Hello world! It was the best of times, it was the worst of times.",
        "def add(a, b):\n    return a + b  # 12345",
        "Naïve café — 你好 🙂",
    ]
    for sample in samples:
        ids = tokenizer.encode(sample, prepend="<|bos|>")
        pieces = [tokenizer.id_to_token(i) for i in ids]
        print(f"{len(sample.encode('utf-8'))} bytes -> {len(ids) - 1} tokens: {pieces}")


if __name__ == "__main__":
    main()
