#!/usr/bin/env bash
# Fetch MovieLens-100K (ml-100k.inter, RecBole atomic format, tab-separated, header
# `user_id:token item_id:token rating:float timestamp:float`) from the PyPI wheel recbole==1.2.1.
# GroupLens terms forbid redistribution: the file goes to data/ (git-ignored); never commit it.
# Usage: tools/data/fetch_movielens.sh [OUT_FILE]   (default: data/ml-100k.inter, relative to the repo)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$repo/data/ml-100k.inter}"
member="recbole/dataset_example/ml-100k/ml-100k.inter"

# livemb's log reader picks the format from the suffix and does not know `.inter`: also offer the
# same file under a `.tsv` name (a symlink next to it), which `livemb evaluate --data` accepts.
tsv_link() {
    local link="${out%.inter}.tsv"
    if [[ "$link" != "$out" && ! -e "$link" ]]; then
        ln -s "$(basename "$out")" "$link"
        echo "linked $link -> $(basename "$out") (tab-separated; use it with livemb --data)"
    fi
}

if [[ -s "$out" ]]; then
    echo "already present: $out (delete it to fetch again)"
    tsv_link
    exit 0
fi

if [[ -x "$repo/.venv/bin/python" ]]; then
    py="$repo/.venv/bin/python"
    if [[ -x "$repo/.venv/bin/pip" ]]; then pip=("$repo/.venv/bin/pip"); else pip=("$py" -m pip); fi
else
    py="python3"
    pip=(python3 -m pip)
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading recbole==1.2.1 wheel (no dependencies) to $tmp ..."
"${pip[@]}" download --quiet --no-deps --only-binary=:all: recbole==1.2.1 -d "$tmp"
wheel="$(ls "$tmp"/recbole-1.2.1-*.whl 2>/dev/null | head -n 1 || true)"
if [[ -z "$wheel" ]]; then
    echo "error: no recbole 1.2.1 wheel in $tmp" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
"$py" - "$wheel" "$member" "$out" <<'PY'
import os, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    data = z.read(member)
tmp = out + ".part"
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, out)
lines = data.count(b"\n")
print(f"wrote {out} ({len(data)} bytes, {lines} lines incl. header)")
PY
tsv_link
echo "MovieLens-100K is at: $out (do not commit it)"
