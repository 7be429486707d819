"""Test setup: offline, quiet, and every artifact in a temporary base dir."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("MC_BASE_DIR", tempfile.mkdtemp(prefix="mc-test-base-"))
os.environ.setdefault("MC_REPORT_DIR", tempfile.mkdtemp(prefix="mc-test-report-"))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest  # noqa: E402


def tiny_corpus(n_docs: int = 12) -> list[str]:
    """A few KB of English from Python's own help texts, split into documents."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:120_000]
    size = len(text) // n_docs
    return [text[i * size:(i + 1) * size] for i in range(n_docs)]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: intra-op threads only add synchronisation (and stall
    when the CPU is shared). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_env():
    """A trained 512-token tokenizer in $MC_BASE_DIR/tokenizer and a small text data directory."""
    from pathlib import Path
    from nanochat.common import get_base_dir
    from nanochat.tokenizer import Tokenizer
    base = get_base_dir()
    data_dir = Path(base) / "tiny_text"
    data_dir.mkdir(exist_ok=True)
    docs = tiny_corpus()
    for i, doc in enumerate(docs):
        (data_dir / f"doc{i:02d}.txt").write_text(doc)
    tokenizer = Tokenizer.train_from_iterator(iter(docs), 512)
    tokenizer.save(base / "tokenizer")
    return {"base": base, "data": str(data_dir), "tokenizer": tokenizer}
