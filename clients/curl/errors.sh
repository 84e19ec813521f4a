#!/usr/bin/env bash
# Errors are RFC 9457 problem+json: type, title, status, detail, a machine-readable code and,
# for bad input, the offending field. A rejected request leaves the session unchanged.
#   OPTSERVE_BASE_URL=http://127.0.0.1:8000 clients/curl/errors.sh
set -euo pipefail
source "$(dirname "$0")/_lib.sh"

ID="curl-errors-$$-$RANDOM"
SESSIONS+=("$ID")

# check_problem STATUS [FIELD]: the last answer is problem+json with this status (and field)
check_problem() {
  [[ "$(header content-type)" == application/problem+json* ]] \
    || fail "content type $(header content-type), expected application/problem+json"
  py '
status, field = int(args[0]), (args[1] if len(args) > 1 else None)
for key in ("type", "title", "status", "detail", "code"):
    if key not in d:
        fail("problem lacks %r: %r" % (key, d))
if d["status"] != status or d["type"] != "urn:optserve:problem:" + d["code"]:
    fail("status/type/code: %r" % (d,))
if field is not None and d.get("field") != field:
    fail("field %r, expected %r" % (d.get("field"), field))
print("  %d %-28s field=%-8s %s" % (d["status"], d["code"], d.get("field"), d["detail"][:70]))
' "$@"
}

echo "404: unknown session"
call 404 GET "/v1/sessions/no-such-session-$$"
check_problem 404

call 201 POST /v1/sessions -H 'Content-Type: application/json' --data-binary '{
  "id": "'"$ID"'", "optimizer": "SGD", "options": {"lr": 0.5},
  "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}}'

echo "409: the id is taken"
call 409 POST /v1/sessions -H 'Content-Type: application/json' --data-binary '{
  "id": "'"$ID"'", "optimizer": "Adam",
  "params": {"w": {"dtype": "float32", "shape": [1], "data": [0.0]}}}'
check_problem 409

echo "422: a gradient of the wrong shape"
call 422 POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' \
  --data-binary '{"grads": {"w": {"dtype": "float32", "shape": [3], "data": [1, 2, 3]}}}'
check_problem 422 grads.w

echo "422: a float64 gradient for a float32 parameter (no silent casts)"
call 422 POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' \
  --data-binary '{"grads": {"w": {"dtype": "float64", "shape": [2], "data": [1, 2]}}}'
check_problem 422 grads.w

echo "422: an invalid hyperparameter (torch's own ValueError)"
call 422 POST /v1/sessions -H 'Content-Type: application/json' --data-binary '{
  "optimizer": "SGD", "options": {"lr": -1},
  "params": {"w": {"dtype": "float32", "shape": [1], "data": [0.0]}}}'
check_problem 422 options.lr

echo "400: a body that is not JSON"
call 400 POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' --data-binary '{"grads": '
check_problem 400

# nothing above changed the session: a correct step still moves w from [1, 2] by 0.5 * g
call 200 POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' \
  --data-binary '{"grads": {"w": {"dtype": "float32", "shape": [2], "data": [0.5, -1.0]}}}'
py '
if d["version"] != 1 or d["step"] != 1 or d["params"]["w"]["data"] != [0.75, 2.5]:
    fail("after the rejected requests, a step gave %r; expected version 1, w = [0.75, 2.5]" % (d,))
'
echo "errors.sh: OK (the rejected requests left the session unchanged: w = [0.75, 2.5] after one step)"
