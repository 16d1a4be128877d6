#!/usr/bin/env bash
# Debian's headless Chromium + the matching chromedriver, for the chat-page test (tests/test_page.py drives them with
# Selenium). Idempotent: installs only what is missing. Needs root (CI runs as root); apt, no browser download.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tools/install-browser.sh: chromium/chromedriver missing; run as root: apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q chromium chromium-driver
command -v chromium >/dev/null && command -v chromedriver >/dev/null
