#!/usr/bin/env bash
# Reproduces data/kjv.txt.gz, the default training corpus: the King James Bible (public domain)
# as Debian's bible-kjv package prints it. Needs `apt-get install bible-kjv`.
set -euo pipefail
cd "$(dirname "$0")/.."
bible -f Gen1:1-Rev22:21 > data/kjv.txt
gzip -9 -n -f data/kjv.txt
ls -l data/kjv.txt.gz
