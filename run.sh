#!/usr/bin/env bash
# The two set-up commands of the README:
#   ./run.sh demo   install into .venv, then run `curate build-lvd` on the bundled demo pool
#   ./run.sh test   install into .venv (with test extras), then `ruff check` the tree and run the whole test suite
# Both are idempotent: the install is skipped when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-}"
case "$what" in demo|test) ;; *) echo "usage: ./run.sh demo|test" >&2; exit 2;; esac

VENV=.venv
STAMP="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)-$what"
if [ ! -f "$STAMP" ]; then
  python3 -m venv "$VENV" 2>/dev/null || true
  [ -x "$VENV/bin/python" ] || { echo "could not create $VENV with python3 -m venv" >&2; exit 1; }
  links=$(python3 -m pip config get global.find-links 2>/dev/null || true)
  extras=""; [ "$what" = test ] && extras="[test]"
  if command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv >/dev/null 2>&1; then
    uvcmd=$(command -v uv || echo "python3 -m uv")
    # --compile-bytecode: every process (Ray workers, torchrun ranks) then starts without compiling
    # torch's sources again; with PYTHONDONTWRITEBYTECODE set that was ~4 s per training process
    $uvcmd pip install -q --compile-bytecode --python "$VENV/bin/python" ${links:+--find-links "$links"} -e ".$extras"
  else
    "$VENV/bin/python" -m pip install -q ${links:+--find-links "$links"} -e ".$extras"
  fi
  "$VENV/bin/python" -m compileall -q catalog curation pipelines training >/dev/null  # our own modules, alike
  touch "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"

if [ "$what" = demo ]; then
  exec "$VENV/bin/curate" demo "${2:-demo_out}"
fi
"$VENV/bin/ruff" check . || { echo "ERROR: ruff check failed (fix the lines above)" >&2; exit 1; }
# pytest exits 5 when it collected no test: that must fail loudly, not pass.
set +e
# Two workers (pytest-xdist), a test file per worker at a time: its module fixtures are built once.
"$VENV/bin/python" -m pytest -n 2 --dist loadfile "${@:2}"
rc=$?
[ $rc -eq 5 ] && echo "ERROR: pytest collected no tests" >&2
exit $rc
