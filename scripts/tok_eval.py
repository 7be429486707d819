"""Compression of the trained tokenizer (UTF-8 bytes per token, higher is better) on built-in
samples and on the train/val splits, next to GPT-2 and GPT-4 when tiktoken has them cached; printed
and written to the report section "tokenizer-eval".

    uv run python -m scripts.tok_eval --max_docs=200
"""

import argparse
import itertools

import tiktoken

from nanochat import report
from nanochat.configurator import FlagParser, checked_number
from nanochat.eval_plots import markdown_table
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


def load_comparisons() -> tuple[dict, list]:
    """tiktoken's reference encodings that load, and the names of those that do not: they download on
    first use, so offline they are usually missing."""
    encodings, missing = {}, []
    for name in ["gpt2", "cl100k_base"]:
        try:
            encodings[name] = tiktoken.get_encoding(name)
        except OSError:  # requests' connection errors are OSErrors
            print(f"{name}: not available offline, skipped")
            missing.append(name)
    return encodings, missing


def main(argv=None):
    parser = FlagParser(description="Print the tokenizer's compression ratio (bytes per token) and write it to the report.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    splits = {f"{args.data}/{split}": split for split in ["train", "val"]} if args.max_docs > 0 else {}  # label -> split
    if splits:
        from nanochat import dataset
        try:
            data_dir = dataset.prepare(args.data, args.text_column)
        except (dataset.DataError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        for label, split in splits.items():
            texts[label] = list(itertools.islice(dataset.iter_documents(data_dir, split=split), args.max_docs))

    columns = {"ours": tokenizer.encode}  # name -> batch encoder, list[str] -> list[list[int]]
    references, missing = load_comparisons()
    for name, enc in references.items():
        columns[name] = enc.encode_ordinary_batch

    # one row per text: its size, then bytes/token for each tokenizer
    rows = []
    for label, docs in texts.items():
        n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
        n_tokens = [sum(len(ids) for ids in encode(docs)) for encode in columns.values()]
        rows.append([label, n_bytes, *(n_bytes / max(n, 1) for n in n_tokens)])
    header = f"{'text':<16}{'bytes':>12}" + "".join(f"{name:>14}" for name in columns)
    print(header)
    print("-" * len(header))
    for label, n_bytes, *ratios in rows:
        print(f"{label:<16}{n_bytes:>12,}" + "".join(f"{r:>14.2f}" for r in ratios))

    report.log_section("tokenizer-eval", "Tokenizer evaluation", [
        {"vocab size": f"{tokenizer.vocab_size:,}", "identity": tokenizer.identity(),
         **{f"bytes/token, {label}": ours for label, _, ours, *_ in rows if label in splits}},
        "Compression: UTF-8 bytes per token (higher is better) on built-in samples"
        + (f" and {args.max_docs} documents of each split" if splits else "")
        + (f"; not available offline: {', '.join(missing)}" if missing else "") + ":",
        markdown_table(["text", "bytes", *columns], [[label, f"{n:,}", *ratios] for label, n, *ratios in rows], digits=2),
    ])


if __name__ == "__main__":
    main()
