"""The MegaContext session file (`MCSession.save` / `MCSession.load`, mc/session.py): its format marker and
version, and what makes a stored session trustworthy: a hash of the configs, a fingerprint of the weights
that made its gists, a digest of its whole content, and a reader that turns foreign or damaged bytes into
one clear error."""

import hashlib
import json
import os
from dataclasses import asdict

import torch

from nanochat.checkpoint import load_error_reason

FORMAT = "megacontext-session"
FORMAT_VERSION = 2


def config_hash(config) -> str:
    """Short stable hash of a dataclass config."""
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:16]


def content_digest(obj, h=None) -> str:
    """SHA-256 of a saved state's content (tensors by dtype, shape and bytes; dicts, lists and scalars by value):
    recorded in a session file and checked on load, so a file changed on disk is refused."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(f"tensor {obj.dtype} {tuple(obj.shape)};".encode())
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)};".encode())
        for key in sorted(obj, key=str):
            h.update(f"{key!r}:".encode())
            content_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"list {len(obj)};".encode())
        for item in obj:
            content_digest(item, h)
    else:
        h.update(f"{type(obj).__name__} {obj!r};".encode())
    return h.hexdigest()


def weights_fingerprint(controller) -> str:
    """Hash of the weights that made a tree's stored tensors: the GPT's embedding and the GistNet."""
    h = hashlib.sha256()
    tensors = [("wte", controller.model.transformer.wte.weight)] + list(controller.gistnet.state_dict().items())
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def read_session_file(path: str):
    """The object torch saved at `path` (weights only), or a clear error for a missing, corrupt or truncated file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"MegaContext session file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure of foreign bytes (pickle raises a zoo of types)
        raise ValueError(f"{path} is not a readable MegaContext session: corrupt or truncated "
                         f"({load_error_reason(e)})") from None
