#!/usr/bin/env bash
# Run the test suite (offline, CPU). Extra arguments go to pytest, e.g. `bash tests.sh -k gpt`.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
exec uv run pytest -q "$@"
