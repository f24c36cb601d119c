#!/usr/bin/env bash
# Installs Debian's Chromium and its matching driver for the browser test of the web app (tests/test_browser.py).
# Idempotent: does nothing when /usr/bin/chromedriver is already there. Needs root (CI runs as root) and apt-get.
set -euo pipefail
if [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: apt-get not found; install Chromium and chromedriver (same version) by hand" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq chromium chromium-driver >/dev/null
echo "installed $(/usr/bin/chromium --version 2>/dev/null) / $(/usr/bin/chromedriver --version)"
