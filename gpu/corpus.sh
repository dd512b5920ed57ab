#!/usr/bin/env bash
# Here, before a study call: copy the four training shards and the valid shard of the w4a4-125m plan
# into gpu/corpus (ignored by git; 43.6 MB, which with the repo and .whl fits one call's 64 MiB).
# Carry it with `carry: [".whl", "gpu/corpus"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-../shared/data/pretrain-corpus}
mkdir -p gpu/corpus
for s in wikipedia-00 gutenberg-00 gutenberg-01 news-speech-brown-00 valid; do cp "$src/$s.jsonl.xz" gpu/corpus/; done
du -sh gpu/corpus
