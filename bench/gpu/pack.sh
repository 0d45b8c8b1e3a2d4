#!/usr/bin/env bash
# Pack what the lent GPU machine lacks for issue 4's measurement -- NVIDIA DALI and the runtime libraries it loads --
# into parts small enough for the device tool (64 MiB per call, working tree included). Run here, where pip reaches
# the package registry; the device machine reaches nothing.
#
#   bash bench/gpu/pack.sh            # -> .gpu/site.tar.xz.part00 .. part02 and .gpu/SHA256SUMS (git-ignored)
#
# The wheels are unzipped and recompressed as one tar.xz (about 180 MB instead of about 270 MB of wheels: three
# device calls instead of five). bench/gpu/run.sh on the device joins the parts, checks them against SHA256SUMS and
# unpacks them into its Python's site-packages, as pip would. bench/results/README.md gives the device calls.
#
# Environment: PYVER (the device's Python, default 3.12), PART_MIB (default 61), DALI_VERSION (default 2.4.0).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER="${PYVER:-3.12}"
PART_MIB="${PART_MIB:-61}"
DALI_VERSION="${DALI_VERSION:-2.4.0}"
dest=.gpu
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# DALI's Requires-Dist that the GPU image lacks: nvImageCodec with nvJPEG (the `mixed` decoder), nvCOMP and DALI's
# small pure-Python needs. The image has numpy, packaging, pyyaml and six; six comes along anyway (11 kB: astunparse
# fails without it). nvjpeg2k / nvtiff ([all]) are left out: JPEG 2000 and TIFF are never decoded here.
pkgs=(
  "nvidia-dali-cuda130==${DALI_VERSION}"
  "nvidia-nvimgcodec-cu13>=0.9.0,<0.10.0"
  "nvidia-nvjpeg>=13,<14"
  "nvidia-libnvcomp-cu13==5.3.0.16"
  "astunparse>=1.6,<=1.6.3" "gast>=0.3.3,<=0.7.0" optree nvtx makefun "libcst~=1.8" "six>=1.16,<=1.17"
)
plat=()
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
  manylinux_2_34 manylinux_2_35; do
  plat+=(--platform "${p}_x86_64")
done
echo "== downloading for CPython ${PYVER}, x86_64 (no dependencies beyond the list)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plat[@]}" \
  --platform any -d "$work/wheels" "${pkgs[@]}"
ls -l "$work/wheels"

echo "== unzipping into one site-packages tree and compressing (xz -9, a few minutes on 2 cores)"
mkdir -p "$work/site"
for w in "$work"/wheels/*.whl; do
  python3 -m zipfile -e "$w" "$work/site"
done
tar -C "$work/site" -cf - . | xz -T0 -9 >"$work/site.tar.xz"

rm -rf "$dest"
mkdir -p "$dest"
split -b "${PART_MIB}M" -d "$work/site.tar.xz" "$dest/site.tar.xz.part"
(cd "$dest" && sha256sum site.tar.xz.part* >SHA256SUMS)
{
  echo "python=${PYVER} dali=${DALI_VERSION}"
  (cd "$work/wheels" && ls)
} >"$dest/MANIFEST"
ls -l "$dest"
echo "packed $(du -sh "$work/site.tar.xz" | cut -f1) in $(ls "$dest"/site.tar.xz.part* | wc -l) part(s) under $dest/"
