#!/usr/bin/env bash
# Refresh constraints.txt, the tested set of dependency versions that CI installs.
#
# Builds a fresh virtual environment from pyproject's ranges alone (no constraints), so it takes
# the newest releases those ranges allow; runs the whole suite there; and only if it passes,
# writes that environment's versions to constraints.txt. Review the diff, then commit it.
# Usage: tools/refresh_constraints.sh   (from anywhere; takes a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0 -e ".[test,hf,ray,grammar,xgrammar,gguf]" -e plugins/decodekit-dry -e plugins/decodekit-mirostat -e plugins/decodekit-xtc
pytest -n 2 -q
{
  echo "# The tested set of dependency versions CI installs (README's second command, .ci/run)."
  echo "# pyproject.toml keeps ranges for users; refresh this on purpose: tools/refresh_constraints.sh"
  echo "# (docs/development.md). Written $(date -u +%F) by that script after the suite passed."
  pip freeze --exclude-editable | grep -v '^#' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt
echo "constraints.txt refreshed; review with: git diff constraints.txt"
