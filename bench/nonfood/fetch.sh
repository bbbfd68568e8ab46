#!/usr/bin/env bash
# Collect the non-food photos of bench/nonfood/README.md into DEST (default /tmp/nonfood-photos), from the package
# registries only: the scikit-image wheel (PyPI), two Debian wallpaper packages (apt), and the sample photos that the
# installed scikit-learn and matplotlib ship. Nothing is installed; every file listed in MANIFEST must arrive.
# usage: bash bench/nonfood/fetch.sh [DEST]   (run it where `python` is the project's environment)
set -euo pipefail
DEST=${1:-/tmp/nonfood-photos}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DEST"

pip download --quiet --no-deps --only-binary=:all: -d "$WORK/wheel" scikit-image==0.26.0
python - "$WORK/wheel" "$WORK/skimage" <<'PY'
import glob, sys, zipfile
z = zipfile.ZipFile(glob.glob(f'{sys.argv[1]}/scikit_image-*.whl')[0])
for n in z.namelist():
    if n.startswith('skimage/data/'): z.extract(n, sys.argv[2])
PY
( cd "$WORK" && apt-get download mate-backgrounds=1.26.0-1 'plasma-workspace-wallpapers=4:5.27.5-2' >/dev/null 2>&1 )
for deb in "$WORK"/*.deb; do dpkg-deb -x "$deb" "$WORK/deb"; done
SKLEARN=$(python -c "import sklearn.datasets, os; print(os.path.dirname(sklearn.datasets.__file__))")/images
MPL=$(python -c "import matplotlib; print(matplotlib.get_data_path())")/sample_data

n=0
while IFS=$'\t' read -r name src rest; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  case "$src" in
    skimage:*)  from="$WORK/skimage/skimage/data/${src#skimage:}" ;;
    mate:*)     from="$WORK/deb/usr/share/backgrounds/mate/${src#mate:}" ;;
    plasma:*)   from=$(ls -S "$WORK/deb/usr/share/wallpapers/${src#plasma:}/contents/images/"*.jpg | tail -1) ;;  # the smallest size
    sklearn:*)  from="$SKLEARN/${src#sklearn:}" ;;
    mpl:*)      from="$MPL/${src#mpl:}" ;;
    *) echo "unknown source $src" >&2; exit 1 ;;
  esac
  cp "$from" "$DEST/$name"; n=$((n + 1))
done < "$HERE/MANIFEST.tsv"
echo "$n non-food photos in $DEST"
