#!/usr/bin/env bash
# Export an optimizer's state as JSON and as a torch.save file, re-import each into the same
# (live, never deleted) session, and check the session then steps exactly as it did after the
# export, and exactly as in-process torch.optim.Adam ("adam" of clients/js/test/make_reference.py,
# run on this machine by the server's python; see _lib.sh).
#   OPTSERVE_BASE_URL=http://127.0.0.1:8000 clients/curl/state.sh
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
reference

ID="curl-state-$$-$RANDOM"
SESSIONS+=("$ID")

# the create body and each step's grads, straight from the reference fixture
py '
strip = lambda ts: {n: {k: v[k] for k in ("dtype", "shape", "data")} for n, v in ts.items()}
adam = ref["adam"]
with open(args[1] + "/create.json", "w") as f:
    json.dump({"id": args[0], "optimizer": adam["optimizer"], "options": adam["options"],
               "params": strip(adam["params0"])}, f)
for i, s in enumerate(adam["steps"], 1):
    with open("%s/grads%d.json" % (args[1], i), "w") as f:
        json.dump({"grads": strip(s["grads"])}, f)
' "$ID" "$WORK"

# step N TAG: POST the N-th grads and check the params against torch bit for bit; with TAG other
# than "first", also check the answer equals the first run's (params, lr)
step() {
  local n=$1 tag=$2
  call 200 POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' --data-binary "@$WORK/grads$n.json"
  cp "$BODY" "$WORK/$tag-step$n.json"
  py '
n, tag, work = int(args[0]), args[1], args[2]
for name, w in ref["adam"]["steps"][n - 1]["params"].items():
    if [f32bits(v) for v in d["params"][name]["data"]] != w["bits"]:
        fail("%s: %s after step %d is %r, torch gives %r" % (tag, name, n, d["params"][name]["data"], w["data"]))
if tag != "first":
    first = json.load(open("%s/first-step%d.json" % (work, n)))
    if (d["params"], d["lr"], d["skipped"]) != (first["params"], first["lr"], first["skipped"]):
        fail("step %d after the %s import differs from the original continuation" % (n, tag))
' "$n" "$tag" "$WORK"
}

call 201 POST /v1/sessions -H 'Content-Type: application/json' --data-binary "@$WORK/create.json"
for n in 1 2 3; do step "$n" first; done

# keep the params and the state at step 3, in both formats
call 200 GET "/v1/sessions/$ID/params"
py 'print(json.dumps({"params": d["params"]}))' >"$WORK/params3.json"
call 200 GET "/v1/sessions/$ID/state_dict"
cp "$BODY" "$WORK/state3.json"
py '
s = d["state"]
if sorted(s) != ["0", "1"] or s["0"]["step"]["data"] != [3.0]:
    fail("unexpected state: %r" % (s,))
want = ref["adam"]
if d["param_groups"][0]["param_names"] != list(want["params0"]):
    fail("param_names %r" % (d["param_groups"][0]["param_names"],))
'
call 200 GET "/v1/sessions/$ID/state_dict?format=torch" -H 'Accept: application/octet-stream'
cp "$BODY" "$WORK/state3.pt"
[[ "$(header content-type)" == application/octet-stream* ]] || fail "torch file content type: $(header content-type)"
python3 -c 'import sys, zipfile; sys.exit(0 if zipfile.is_zipfile(sys.argv[1]) else 1)' "$WORK/state3.pt" \
  || fail "the torch export is not a torch.save (zip) file"
echo "exported state at step 3: $(wc -c <"$WORK/state3.json") bytes of JSON, $(wc -c <"$WORK/state3.pt") bytes of torch file"

# the continuation every re-import must reproduce (params and lr; the session's own step
# and version counters keep counting)
for n in 4 5; do step "$n" first; done

reimport() {
  local tag=$1
  shift
  call 200 PUT "/v1/sessions/$ID/params" -H 'Content-Type: application/json' --data-binary "@$WORK/params3.json"
  call 200 PUT "/v1/sessions/$ID/state_dict$1" "${@:2}"
  # the state now reads back as exported
  call 200 GET "/v1/sessions/$ID/state_dict"
  python3 -c 'import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
sys.exit(0 if a == b else "FAIL: the state re-exported after the %s import differs" % sys.argv[3])' \
    "$BODY" "$WORK/state3.json" "$tag"
  for n in 4 5; do step "$n" "$tag"; done
  echo "re-imported $tag state: steps 4 and 5 identical (and equal to torch)"
}

reimport json "" -H 'Content-Type: application/json' --data-binary "@$WORK/state3.json"
reimport torch "?format=torch" -H 'Content-Type: application/octet-stream' --data-binary "@$WORK/state3.pt"

call 200 GET "/v1/sessions/$ID"
echo "state.sh: OK (session $ID at version $(py 'print(d["version"])'), step $(py 'print(d["step"])'))"
