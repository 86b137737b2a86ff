#!/usr/bin/env bash
# Build an emulated Raspberry Pi userland (arm64 Debian bookworm + the edge runner's wheels) for
# tests/test_edge_arm64.py, which runs edge/classify.py --validate in it under proot + qemu.
#
#   bash .ci/pi-rootfs.sh [ROOT]      (default: $TRASHSORT_PI_ROOT, else ~/.cache/trashsort/pi-rootfs)
#
# - debootstrap --foreign only downloads and unpacks: the debs of python3 are unpacked by hand with
#   dpkg-deb, so no emulated second stage is needed (~30 s, not minutes).
# - pip installs aarch64 wheels of ai-edge-litert, numpy, pillow with every manylinux aarch64 tag
#   spelled out: pip does not widen --platform, and with too few tags it silently falls back to an
#   old ai-edge-litert.
# - The rootfs is reused when its stamp matches this script and the wheel pins (a cache).
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${1:-${TRASHSORT_PI_ROOT:-$HOME/.cache/trashsort/pi-rootfs}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=(ai-edge-litert==2.3.0 "numpy>=2,<3" "pillow>=11")
STAMP="$(sha256sum "$0" | cut -c1-16) ${WHEELS[*]}"

if [ -f "$ROOT/.trashsort-stamp" ] && [ "$(cat "$ROOT/.trashsort-stamp")" = "$STAMP" ]; then
  echo "pi-rootfs: reusing $ROOT"
  exit 0
fi

need=()
for tool in debootstrap:debootstrap proot:proot qemu-aarch64-static:qemu-user-static; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "pi-rootfs: installing ${need[*]}"
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${need[@]}" >/dev/null; }
fi

start=$(date +%s)
rm -rf "$ROOT.partial"
mkdir -p "$ROOT.partial"
debootstrap --variant=minbase --foreign --arch=arm64 --include=python3 bookworm "$ROOT.partial" "$MIRROR" \
  > "$ROOT.partial.log" 2>&1 || { tail -20 "$ROOT.partial.log"; exit 1; }
for deb in "$ROOT.partial"/var/cache/apt/archives/*.deb; do
  dpkg-deb -x "$deb" "$ROOT.partial"
done

PLATFORMS=()
for tag in manylinux2014_aarch64 manylinux_2_17_aarch64 manylinux_2_24_aarch64 manylinux_2_26_aarch64 \
           manylinux_2_27_aarch64 manylinux_2_28_aarch64 manylinux_2_31_aarch64 manylinux_2_34_aarch64 \
           manylinux_2_35_aarch64 manylinux_2_36_aarch64; do
  PLATFORMS+=(--platform "$tag")
done
python3 -m pip install --quiet --disable-pip-version-check --target "$ROOT.partial/opt/edge-site" \
  --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 "${PLATFORMS[@]}" "${WHEELS[@]}"

# XNNPACK picks its Arm kernels from /proc/cpuinfo: a Raspberry Pi 4's Cortex-A72 (qemu's default
# "max" CPU gave wrong INT8 results in a trial; the host's /proc makes runs segfault).
cat > "$ROOT.partial/opt/cpuinfo-cortex-a72" <<'EOF'
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

Hardware	: BCM2835
Model		: Raspberry Pi 4 Model B Rev 1.4
EOF

# ...and the CPU lists from /sys (without them cpuinfo fails and XNNPACK is not used at all).
printf '0-3\n' > "$ROOT.partial/opt/cpu-list"

echo "$STAMP" > "$ROOT.partial/.trashsort-stamp"
rm -rf "$ROOT" "$ROOT.partial.log"
mv "$ROOT.partial" "$ROOT"
echo "pi-rootfs: built $ROOT in $(( $(date +%s) - start ))s ($(du -sh "$ROOT" | cut -f1))"
