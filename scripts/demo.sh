#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then serves examples/demo_app.py on
# http://127.0.0.1:8000 with 2 workers x 2 threads. Ctrl-C stops it gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo
echo "Serving examples/demo_app.py on http://127.0.0.1:8000 (Ctrl-C to stop)"
exec .venv/bin/corral --http 127.0.0.1:8000 --workers 2 --threads 2 --chdir examples demo_app:app
