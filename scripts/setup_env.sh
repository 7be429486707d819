# Sourced by the recipes: make sure uv exists and the project environment is synced.
# uv comes from PyPI (pip), the one installer every machine here can reach.
if ! command -v uv >/dev/null 2>&1; then
    export PATH="$HOME/.local/bin:$PATH"
fi
if ! command -v uv >/dev/null 2>&1; then
    echo "uv not found: installing it with pip"
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
    hash -r
    echo "uv installed at $(command -v uv); a new shell finds it after: export PATH=\"$(dirname "$(command -v uv)"):\$PATH\""
    echo "(or run the project's Python directly: .venv/bin/python -m scripts.chat_cli)"
fi
uv sync --frozen --quiet
