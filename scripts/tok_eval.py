"""Compression of the trained tokenizer (UTF-8 bytes per token, higher is better) on built-in
samples and on the train/val splits, next to GPT-2 and GPT-4 when tiktoken has them cached.

    uv run python -m scripts.tok_eval --max_docs=200
"""

import argparse
import itertools

import tiktoken

from nanochat.configurator import FlagParser, checked_number
from nanochat.tokenizer import TokenizerError, get_tokenizer

PROSE = """The old lighthouse keeper climbed the spiral stairs each evening, counting the steps as his
father had taught him. Ships no longer needed the light, but he kept it burning anyway, because a
promise, he said, does not expire just because nobody is watching. On stormy nights the whole tower
hummed like a struck bell, and he would sit by the lamp with a mug of tea and a worn paperback."""

CODE = '''def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
'''

NUMBERS = "In 2023 revenue rose 14.7% to $3,482,915.26; Q4 units: 18204, 99731, 5.0e-3, 0x1F4A, 3.14159265."

SAMPLES = {"prose": PROSE, "code": CODE, "numbers": NUMBERS}


def load_comparisons() -> dict:
    """tiktoken's reference encodings; they download on first use, so offline they are usually missing."""
    encodings = {}
    for name in ["gpt2", "cl100k_base"]:
        try:
            encodings[name] = tiktoken.get_encoding(name)
        except OSError:  # requests' connection errors are OSErrors
            print(f"{name}: not available offline, skipped")
    return encodings


def main(argv=None):
    parser = FlagParser(description="Print the tokenizer's compression ratio (bytes per token).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=str, default="books", help="dataset source passed to nanochat.dataset.prepare")
    parser.add_argument("--text_column", type=str, default="text", help="with a directory --data: the .jsonl field / .parquet column holding the documents")
    parser.add_argument("--max_docs", type=checked_number(int, 0), default=200, help="documents read from each split (0 skips the data)")
    args = parser.parse_args(argv)

    try:
        tokenizer = get_tokenizer()
    except (TokenizerError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(f"tokenizer vocab_size={tokenizer.vocab_size} identity={tokenizer.identity()}")
    texts = {label: [text] for label, text in SAMPLES.items()}  # label -> list of documents
    if args.max_docs > 0:
        from nanochat import dataset
        data_dir = dataset.prepare(args.data, args.text_column)
        for split in ["train", "val"]:
            docs = itertools.islice(dataset.iter_documents(data_dir, split=split), args.max_docs)
            texts[f"{args.data}/{split}"] = list(docs)

    columns = {"ours": tokenizer.encode}  # name -> batch encoder, list[str] -> list[list[int]]
    for name, enc in load_comparisons().items():
        columns[name] = enc.encode_ordinary_batch

    # one row per text: its size, then bytes/token for each tokenizer
    header = f"{'text':<16}{'bytes':>12}" + "".join(f"{name:>14}" for name in columns)
    print(header)
    print("-" * len(header))
    for label, docs in texts.items():
        n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
        row = f"{label:<16}{n_bytes:>12,}"
        for encode in columns.values():
            n_tokens = sum(len(ids) for ids in encode(docs))
            row += f"{n_bytes / max(n_tokens, 1):>14.2f}"
        print(row)


if __name__ == "__main__":
    main()
