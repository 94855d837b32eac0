#!/usr/bin/env bash
# Stages the Khronos Vulkan validation layer for a GPU host without a package manager (the `validate` suite of
# benches/gpu.sh): Debian's vulkan-validationlayers package, unpacked into .gpu/vklayer/ with a manifest whose
# library path points into that folder, and a settings file that reports errors and warnings to stdout with
# synchronization validation on.
#   benches/stage-validation.sh            then on the host: benches/gpu.sh validate
# The layer's shader checks come from its own SPIR-V validator, as old as the package; modules that use newer
# SPIR-V (cooperative matrices) may be reported as invalid by it: the suite lists such messages apart.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu/vklayer
rm -rf "$dest"; mkdir -p "$dest/deb" "$dest/root"
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/gpu-apt-lists -oDebug::NoLocking=1'
mkdir -p /tmp/gpu-apt-lists/partial
apt-get $o update -qq >/dev/null 2>&1 || true
(cd "$dest/deb" && apt-get $o download -qq vulkan-validationlayers)
dpkg-deb -x "$dest"/deb/vulkan-validationlayers_*.deb "$dest/root"
lib=$(find "$dest/root" -name 'libVkLayer_khronos_validation.so' | head -1)
manifest=$(find "$dest/root" -name 'VkLayer_khronos_validation.json' | head -1)
[ -n "$lib" ] && [ -n "$manifest" ] || { echo "no validation layer in the package" >&2; exit 1; }
strip --strip-unneeded "$lib" 2>/dev/null || true
mkdir -p "$dest/layers"
mv "$lib" "$dest/layers/"
# The manifest names its library by file name; with both in one folder the loader finds it there.
python3 - "$manifest" "$dest/layers/VkLayer_khronos_validation.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["layer"]["library_path"] = "./libVkLayer_khronos_validation.so"
json.dump(m, open(sys.argv[2], "w"), indent=1)
PY
cat > "$dest/layers/vk_layer_settings.txt" <<'TXT'
khronos_validation.debug_action = VK_DBG_LAYER_ACTION_LOG_MSG
khronos_validation.report_flags = error,warn
khronos_validation.log_filename = stdout
khronos_validation.enables = VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT
TXT
rm -rf "$dest/deb" "$dest/root"
ls -la "$dest/layers"; du -sh "$dest"
