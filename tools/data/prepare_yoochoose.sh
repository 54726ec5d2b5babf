#!/usr/bin/env bash
# Concatenate the shared YooChoose-100k sample (train_full + test, header once) into one
# tab-separated log `SessionId ItemId Time` for `livemb evaluate` (its temporal split re-splits it).
# Usage: tools/data/prepare_yoochoose.sh [SRC_DIR] [OUT_FILE]
#   SRC_DIR  default ../shared/data/yoochoose-100k (relative to the repo root)
#   OUT_FILE default data/yoochoose-100k.tsv
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
src="${1:-$repo/../shared/data/yoochoose-100k}"
out="${2:-$repo/data/yoochoose-100k.tsv}"
train="$src/yoochoose-clicks-100k_train_full.txt"
test="$src/yoochoose-clicks-100k_test.txt"

for f in "$train" "$test"; do
    [[ -f "$f" ]] || { echo "error: missing $f (pass the folder as the first argument)" >&2; exit 1; }
done
if [[ -s "$out" ]]; then
    echo "already present: $out (delete it to rebuild)"
    exit 0
fi
if [[ "$(head -n 1 "$train")" != "$(head -n 1 "$test")" ]]; then
    echo "error: headers differ between $train and $test" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
{ cat "$train"; tail -n +2 "$test"; } > "$out.part"
mv "$out.part" "$out"
echo "wrote $out ($(($(wc -l < "$out") - 1)) events from $train + $test)"
