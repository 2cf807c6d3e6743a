#!/usr/bin/env bash
# Debian's Go toolchain for the Modelfile test: tests/modelfile_render/ renders the Modelfile's
# TEMPLATE with Go's own text/template, the engine Ollama uses. Does nothing when `go` is there.
set -euo pipefail
if command -v go >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing Debian's golang-go (apt-get) for the Go-rendered Modelfile test"
$SUDO apt-get install -y -q golang-go >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q golang-go >/dev/null; }
command -v go >/dev/null 2>&1 || { echo "error: go still missing after apt-get; install Go (golang-go) and put it on PATH" >&2; exit 2; }
