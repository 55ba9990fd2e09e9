#!/usr/bin/env bash
# Creates .venv beside this file and installs lmvic into it, with the CPU build of torch.
# Every pip call uses constraints.txt so that nothing can pull a CUDA torch or numpy 2.
# Safe to re-run: an up-to-date environment installs nothing.
set -euo pipefail
cd "$(dirname "$0")"
# ffmpeg (with x265) runs the HEVC anchor of `lmvic eval`.
if ! command -v ffmpeg >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "install.sh: ffmpeg not found; install it (e.g. apt-get install ffmpeg) for the x265 anchor" >&2
  fi
fi
python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install -c constraints.txt torch==2.13.0
pip install -c constraints.txt -e ".[test]"
.venv/bin/python -c "import lmvic, compressai, gsplat, pycolmap" || {
  echo "install.sh: the environment does not import; see the messages above" >&2; exit 1; }
echo "lmvic installed in $(pwd)/.venv (run .venv/bin/lmvic --help)"
