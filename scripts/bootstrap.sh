# Sourced by scripts/demo and scripts/test: makes .venv with the project installed, and (for tests) the Debian
# packages the integration tests use. Idempotent and quiet when everything is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

die() { echo "bootstrap: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root to run: $* (install it, or run this script as root)"
  fi
}

APT_UPDATED=0
apt_install() {  # apt_install PACKAGE...
  command -v apt-get >/dev/null 2>&1 || die "please install these packages with your package manager: $*"
  if [ "$APT_UPDATED" -eq 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need_command() {  # need_command COMMAND DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] || { echo "bootstrap: installing $2 (for $1)"; apt_install "$2"; }
}

command -v "$PY" >/dev/null 2>&1 || die "python3 not found: install Python 3.11 or newer"
"$PY" - <<'PYEOF' || die "Python 3.11 or newer is needed (found $("$PY" --version 2>&1))"
import sys
raise SystemExit(0 if sys.version_info >= (3, 11) else 1)
PYEOF

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c "import ensurepip" >/dev/null 2>&1; then
    echo "bootstrap: installing python3-venv"
    apt_install python3-venv
  fi
  "$PY" -m venv "$VENV"
fi

EXTRAS="${BOOTSTRAP_EXTRAS:-dev}"
STAMP="$VENV/.installed-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "bootstrap: installing edge-fleet[$EXTRAS] into .venv (first run takes a minute)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
