#!/usr/bin/env bash
# Install mesh-llm from this offline release bundle; never downloads or builds anything.
#
#   ./install.sh [--prefix DIR] [--bin-dir DIR] [--models-dir DIR] [--python PYTHON]
#
#   --prefix      the virtualenv to create            (default ~/.mesh-llm/venv)
#   --bin-dir     where the `mesh-llm` link goes      (default ~/.local/bin; /usr/local/bin as root)
#   --models-dir  where the bundled demo model goes   (default ~/.models)
#   --python      Python >= 3.11 of the bundle's minor version (default python3)
#
# Steps: verify every file against manifest.json (sha256), create the venv, install the wheels
# with pip --no-index (only this bundle's wheels/), copy the llama.cpp binaries into
# <prefix>/share/mesh-llm/llama.cpp/bin (where mesh-llm looks for them), copy the demo model if
# the bundle has one, and link <bin-dir>/mesh-llm. Re-running upgrades in place.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX="$HOME/.mesh-llm/venv"
if [ "$(id -u)" = 0 ]; then BIN_DIR=/usr/local/bin; else BIN_DIR="$HOME/.local/bin"; fi
MODELS_DIR="$HOME/.models"
PY=python3

die() { echo "install.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
    --bin-dir) BIN_DIR="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --models-dir) MODELS_DIR="${2:?--models-dir needs a directory}"; shift 2 ;;
    --python) PY="${2:?--python needs a program}"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

command -v "$PY" >/dev/null || die "$PY not found: install Python 3.11+ with venv (Debian: apt-get install python3-venv)"

echo "install.sh: verifying the bundle" >&2
"$PY" - "$HERE" <<'PYEOF' || die "the bundle is damaged or incomplete; download it again"
import hashlib, json, pathlib, sys
top = pathlib.Path(sys.argv[1])
manifest = json.loads((top / "manifest.json").read_text())
want = manifest["python"]
have = f"{sys.version_info.major}.{sys.version_info.minor}"
if have != want:
    sys.exit(f"install.sh: this bundle's wheels are for Python {want}, {sys.executable} is {have}; pass --python python{want}")
bad = []
for name, sha in manifest["files"].items():
    path = top / name
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        bad.append(f"{name}: {exc.strerror}")
        continue
    if digest.hexdigest() != sha:
        bad.append(f"{name}: sha256 mismatch")
for line in bad:
    print(f"install.sh: {line}", file=sys.stderr)
print(f"install.sh: {len(manifest['files']) - len(bad)}/{len(manifest['files'])} files verified", file=sys.stderr)
sys.exit(1 if bad else 0)
PYEOF
VERSION="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$HERE/manifest.json")"

echo "install.sh: installing mesh-llm $VERSION into $PREFIX" >&2
"$PY" -m venv "$PREFIX" || die "cannot create a venv at $PREFIX (Debian: apt-get install python3-venv)"
# Only the bundle's wheels: no index, no pip configuration or PIP_* variables of this machine.
PIP_CONFIG_FILE=/dev/null "$PREFIX/bin/python" -m pip install --isolated --quiet \
  --no-index --find-links "$HERE/wheels" --disable-pip-version-check --upgrade \
  "mesh-llm==$VERSION"

SHARE="$PREFIX/share/mesh-llm"
rm -rf "$SHARE/llama.cpp"
mkdir -p "$SHARE/llama.cpp"
cp -a "$HERE/llama.cpp/bin" "$SHARE/llama.cpp/bin"
cp "$HERE/config.toml" "$SHARE/config.toml.sample"
cp "$HERE/mesh-llm.service" "$SHARE/mesh-llm.service.template"

if compgen -G "$HERE/models/*.gguf" >/dev/null; then
  mkdir -p "$MODELS_DIR"
  for model in "$HERE"/models/*.gguf; do
    echo "install.sh: demo model $(basename "$model") -> $MODELS_DIR" >&2
    cp "$model" "$MODELS_DIR/"
  done
fi

mkdir -p "$BIN_DIR"
ln -sf "$PREFIX/bin/mesh-llm" "$BIN_DIR/mesh-llm"
echo "install.sh: linked $BIN_DIR/mesh-llm" >&2
case ":$PATH:" in
  *":$BIN_DIR:"*) ;;
  *) echo "install.sh: $BIN_DIR is not on your PATH; add it: export PATH=\"$BIN_DIR:\$PATH\"" >&2 ;;
esac
"$PREFIX/bin/mesh-llm" --version
echo "install.sh: done. Next: mesh-llm doctor; mesh-llm --model <file.gguf or catalog name>" >&2
