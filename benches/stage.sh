#!/usr/bin/env bash
# benches/stage.sh DIR [cargo args...]: stages what a GPU host without a Rust toolchain needs into DIR (git-ignored
# through .git/info/exclude): release examples, bins and test binaries built with the cargo args given, packed in one
# xz stream (they share most of their code: ~190 MiB packs to ~13 MiB, under the 64 MiB a device call carries), the
# Vulkan/EGL loader packages, env.sh (unpacks the binaries on first use, installs the loaders, puts bin/ on PATH) and
# the peer scripts. ONLY="name ..." keeps only those binaries (example/bin names, test-<name> for tests).
# On the GPU host, from the project root: source DIR/env.sh && <binary> ...  (e.g. bash benches/run-gpu.sh with STAGE=DIR)
set -euo pipefail
dir=${1:?usage: benches/stage.sh DIR [cargo args]}; shift
root=$(git rev-parse --show-toplevel); cd "$root"
shared=${SHARED:-$root/../shared}         # the workplace's gpu/env.sh and peers/ scripts
debcache=${DEBCACHE:-/tmp/s2attn-debcache}  # the loader .debs, downloaded once
info="$(git rev-parse --git-common-dir)/info"; mkdir -p "$info"
grep -qx "/$dir/" "$info/exclude" 2>/dev/null || echo "/$dir/" >> "$info/exclude"
rm -rf "$dir"; mkdir -p "$dir/bin" "$dir/deb" "$dir/peers"
pick() { python3 -c '
import sys, json, os
only = os.environ.get("ONLY", "").split()
for line in sys.stdin:
    try: j = json.loads(line)
    except ValueError: continue
    if j.get("reason") == "compiler-artifact" and j.get("executable"):
        kind = j["target"]["kind"][0]
        name = ("test-" + j["target"]["name"]) if j["profile"]["test"] else j["target"]["name"]
        if only and name not in only: continue
        if j["profile"]["test"] or kind in ("example", "bin"): print(name, j["executable"])'; }
{ cargo build --release --examples --bins "$@" --message-format=json; cargo test --release --no-run "$@" --message-format=json; } 2>/dev/null \
  | pick | while read -r name exe; do cp "$exe" "$dir/bin/$name"; done
if [ ! -d "$debcache" ] || [ -z "$(ls "$debcache" 2>/dev/null)" ]; then
  mkdir -p "$debcache" /tmp/gpu-apt-lists/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/gpu-apt-lists -oDebug::NoLocking=1'
  apt-get $o update -qq >/dev/null 2>&1 || true
  (cd "$debcache" && apt-get $o download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 2>/dev/null)
fi
cp "$debcache"/*.deb "$dir/deb/"
# env.sh: unpack the compressed binaries on first use, then the shared env.sh (loaders, PATH)
{ echo '_gpu_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)'
  echo '[ -d "$_gpu_dir/bin" ] || tar -C "$_gpu_dir" -xJf "$_gpu_dir/bin.tar.xz"'
  cat "$shared/gpu/env.sh"; } > "$dir/env.sh"
cp "$shared"/peers/*.py "$dir/peers/" 2>/dev/null || true
strip "$dir"/bin/* 2>/dev/null || true
ls -la "$dir/bin"
# binaries share most of their code: one xz stream (single-threaded keeps one dictionary) packs them ~12x
tar -C "$dir" -cf - bin | xz -9 -T1 > "$dir/bin.tar.xz"; rm -rf "$dir/bin"; du -sh "$dir"
size=$(du -sm "$dir" | cut -f1); (( size < 60 )) || echo "WARNING: $dir is ${size} MiB; trim it below 60 MiB (use ONLY=...)"
