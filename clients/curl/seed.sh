#!/usr/bin/env bash
# The seed example over plain REST: f(x) = 4x^2 from x0 = 2 with SGD(lr=0.1, momentum=0.9)
# and StepLR(step_size=10, gamma=0.1); the client computes the gradient 8x and steps 10 times.
# Checks every x bit for bit against in-process torch (clients/js/test/make_reference.py, run on
# this machine by the server's python; see _lib.sh) and the learning rate after 10 steps:
# 0.1 * 0.1 = 0.010000000000000002.
#   OPTSERVE_BASE_URL=http://127.0.0.1:8000 clients/curl/seed.sh
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
reference

ID="curl-seed-$$-$RANDOM"
SESSIONS+=("$ID")

call 201 POST /v1/sessions -H 'Content-Type: application/json' --data-binary '{
  "id": "'"$ID"'",
  "optimizer": "SGD",
  "options": {"lr": 0.1, "momentum": 0.9},
  "params": {"x": {"dtype": "float32", "shape": [1], "data": [2.0]}},
  "scheduler": {"name": "StepLR", "options": {"step_size": 10, "gamma": 0.1}}
}'
py 'assert d["id"] == args[0] and d["step"] == 0 and d["lr"] == [0.1], d' "$ID"
[[ "$(header location)" == "/v1/sessions/$ID" ]] || fail "Location header: $(header location)"

# the gradient of 4x^2 is 8x (exact in float32); python3 writes each step's body
grads='{"grads": {"x": {"dtype": "float32", "shape": [1], "data": [16.0]}}}'
printf '%4s  %-22s %-10s %s\n' step x bits lr
for i in $(seq 1 10); do
  call 200 POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' --data-binary "$grads"
  [[ "$(header x-optserve-step)" == "$i" ]] || fail "X-Optserve-Step: $(header x-optserve-step), expected $i"
  [[ "$(header etag)" == "\"$i\"" ]] || fail "ETag: $(header etag), expected \"$i\""
  out=$(py '
i = int(args[0])
want = ref["seed_momentum"]["steps"][i - 1]
x = d["params"]["x"]["data"][0]
if d["step"] != i or d["version"] != i:
    fail("step/version %s/%s, expected %s" % (d["step"], d["version"], i))
if f32bits(x) != want["x"]["bits"][0]:
    fail("x after step %d is %r (bits %s), torch gives %r (bits %s)"
         % (i, x, f32bits(x), want["x"]["data"][0], want["x"]["bits"][0]))
if d["lr"] != [want["lr"]]:
    fail("lr after step %d is %r, torch gives %r" % (i, d["lr"], want["lr"]))
print("%4d  %-22r %-10s %r" % (i, x, f32bits(x), d["lr"][0]))
print(json.dumps({"grads": {"x": {"dtype": "float32", "shape": [1], "data": [8 * x]}}}))
' "$i")
  head -n 1 <<<"$out"
  grads=$(tail -n 1 <<<"$out")
done

call 200 GET "/v1/sessions/$ID"
py '
if d["lr"] != [0.010000000000000002] or d["param_groups"][0]["lr"] != 0.010000000000000002:
    fail("lr after 10 steps: %r, expected [0.010000000000000002]" % (d["lr"],))
if d["step"] != 10:
    fail("step %r, expected 10" % (d["step"],))
'
grep -q '"lr":\[0.010000000000000002\]' "$BODY" || fail "lr not written as 0.010000000000000002"
echo "seed.sh: OK (10 steps match torch bit for bit; lr = 0.010000000000000002)"
