#!/usr/bin/env bash
# Debian's Chromium for the browser test and `make screenshot` (Playwright drives it; its own
# browser download is never used). Does nothing when a Chromium is already there.
set -euo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing Debian's chromium (apt-get) for the browser test"
$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
test -x "$CHROMIUM" || { echo "error: $CHROMIUM still missing after apt-get; install Chromium and set CHROMIUM=/path/to/chromium" >&2; exit 2; }
