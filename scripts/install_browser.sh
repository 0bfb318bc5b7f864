#!/usr/bin/env bash
# Debian's chromium and the playwright Python package that drives it, for the test that opens the
# evaluation report in a real browser (tests/test_eval_report.py). Playwright downloads no browser
# of its own: the test launches /usr/bin/chromium.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
python3 -m pip install --quiet "playwright>=1.40"
chromium --version
