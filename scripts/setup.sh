#!/usr/bin/env bash
# Installs the project, its dependencies and the test tools (pip, editable). Idempotent: a second run with an
# unchanged pyproject.toml only checks the imports. `--test` also installs Debian's Chromium for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp="cache/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ] || ! python -c "import nbutils, torch, transformer_lens, nbval, selenium" 2>/dev/null; then
  # torch is pinned: an unpinned torch pulls a multi-GB GPU build
  python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
  mkdir -p cache && touch "$stamp"
fi
if [ "${1:-}" = "--test" ] && [ -f scripts/install_browser.sh ]; then
  bash scripts/install_browser.sh
fi
