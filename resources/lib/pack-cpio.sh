#!/usr/bin/env bash
# Write DIR's contents to stdout as an uncompressed newc cpio archive, files
# owned by root, in a stable (sorted) order.
set -euo pipefail
cd "$1"
find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet
