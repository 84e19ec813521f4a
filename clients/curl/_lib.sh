# Shared by the curl examples (sourced, not run). Needs bash, curl and python3 (no jq).
# OPTSERVE_BASE_URL: the server (default http://127.0.0.1:8000).
# OPTSERVE_API_KEY: sent as `Authorization: Bearer <key>` with every request, for a server with
# API keys (the Docker Compose set-up: scripts/make-keys prints the key); unset, none is sent.
# OPTSERVE_REFERENCE: the expected values (clients/js/test/make_reference.py's output, written by
# the server's torch on this machine); unset, `reference` computes them with OPTSERVE_PYTHON
# (default: the repository's .venv/bin/python).
# OPTSERVE_KEEP=1 keeps the sessions the example created (deleted on exit otherwise);
# OPTSERVE_DEBUG_KEEP_WORK=1 keeps the temporary folder of bodies and headers.

BASE="${OPTSERVE_BASE_URL:-http://127.0.0.1:8000}"
BASE="${BASE%/}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="$(mktemp -d)"
REF="" # the reference file, once `reference` has run
BODY="$WORK/body"       # the last response body
HEADERS="$WORK/headers" # the last response headers
SESSIONS=()
AUTH=() # curl's arguments for the API key, if any
if [[ -n "${OPTSERVE_API_KEY:-}" ]]; then
  AUTH=(-H "Authorization: Bearer $OPTSERVE_API_KEY")
fi

cleanup() {
  if [[ "${OPTSERVE_KEEP:-0}" != 1 ]]; then
    for id in "${SESSIONS[@]}"; do
      curl -s -o /dev/null "${AUTH[@]}" -X DELETE "$BASE/v1/sessions/$id" || true
    done
  fi
  [[ -n "${OPTSERVE_DEBUG_KEEP_WORK:-}" ]] && echo "work dir kept: $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
  echo "FAIL ($(basename "$0")): $*" >&2
  exit 1
}

# call STATUS METHOD PATH [curl args...]: one request; the body lands in $BODY. Fails unless
# the answer has the expected HTTP status.
call() {
  local want=$1 method=$2 path=$3
  shift 3
  local got
  got=$(curl -sS -o "$BODY" -D "$HEADERS" -w '%{http_code}' "${AUTH[@]}" -X "$method" "$BASE$path" "$@") \
    || fail "$method $path: curl could not reach $BASE"
  if [[ "$got" != "$want" ]]; then
    echo "--- response body:" >&2
    head -c 2000 "$BODY" >&2 || true
    echo >&2
    fail "$method $path answered HTTP $got, expected $want"
  fi
}

# reference: set REF to the expected values computed by in-process torch on this machine (never a
# committed file: floats differ between CPUs): the file OPTSERVE_REFERENCE names, else a fresh run
# of make_reference.py with the server's python. Call it before `py` code that reads `ref`.
reference() {
  if [[ -n "${OPTSERVE_REFERENCE:-}" ]]; then
    [[ -s "$OPTSERVE_REFERENCE" ]] || fail "OPTSERVE_REFERENCE=$OPTSERVE_REFERENCE is not a non-empty file"
    REF=$OPTSERVE_REFERENCE
    return
  fi
  local python="${OPTSERVE_PYTHON:-$HERE/../../.venv/bin/python}"
  REF="$WORK/expected.json"
  "$python" "$HERE/../js/test/make_reference.py" >"$REF" \
    || fail "cannot compute the expected values with $python (run scripts/bootstrap, or set OPTSERVE_PYTHON to the server's python or OPTSERVE_REFERENCE to a file it wrote)"
}

# py CODE [args...]: run python3 with d = the last JSON body, ref = the expected values (after
# `reference`; None before), and f32bits(x) = the float32 bits of x in hex. Its stdout is the result.
py() {
  local code=$1
  shift
  python3 - "$BODY" "$REF" "$@" <<PYEOF
import json, struct, sys
import os
d = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) and os.path.getsize(sys.argv[1]) else None
ref = json.load(open(sys.argv[2])) if sys.argv[2] else None
args = sys.argv[3:]
def f32bits(x): return "%08x" % struct.unpack("<I", struct.pack("<f", x))[0]
def fail(msg): sys.exit("FAIL: " + msg)
$code
PYEOF
}

# header NAME: a header of the last response.
header() {
  grep -i "^$1:" "$HEADERS" | tail -n 1 | cut -d: -f2- | tr -d ' \r'
}
