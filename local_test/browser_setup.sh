#!/usr/bin/env bash
# Debian's chromium, for the report's browser test (tests/test_report.py) and for looking at a
# report on a machine without a desktop:
#   chromium --headless=new --no-sandbox --screenshot=report.png --window-size=1200,4000 file://$PWD/report.html
# Idempotent: installs only when chromium is missing (Debian/Ubuntu, as root).
set -euo pipefail
command -v chromium >/dev/null && exit 0
[ "$(id -u)" = 0 ] || { echo "error: chromium missing and not root: apt-get install chromium" >&2; exit 1; }
echo "== installing chromium" >&2
apt-get update -q >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
