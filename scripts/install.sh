#!/usr/bin/env bash
# Installs everything codebridge needs on a fresh Debian machine: system packages, torch (CPU) BEFORE the
# project (an unpinned torch would pull gigabytes of CUDA wheels), then the project with its dev and pretrained extras.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v npm >/dev/null || missing+=(npm)
command -v chromium >/dev/null || missing+=(chromium)
ldconfig -p 2>/dev/null | grep -q "libcairo.so.2 " || missing+=(libcairo2)  # cairosvg (corpus SVGs)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev,pretrained]"
