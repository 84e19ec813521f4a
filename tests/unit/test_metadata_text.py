"""Strings in a safetensors answer's ``__metadata__`` come back to a client as the strings
they were. Clients read each value as JSON when it parses and as a bare word otherwise (the
protocol's convention; the SDK and the JS client both): a string that parses as JSON is sent as
a JSON string. An LBFGS step whose random id was decimal digits alone (``token_hex(8)``: one in
~1,800) reached the SDK as a number, its evaluation ``...853.1`` as the float ``...853.0``, and
the client posted an evaluation the step did not wait for (409 ``evaluation_not_pending``, seen
in a CI run of ``test_lbfgs.py``). Step ids now start with a letter as well."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

import optserve._api
from app.api import bodies
from app.engine import evaluations
from app.wire.safetensors_body import write_safetensors


def answer(scalars: dict[str, object]) -> httpx.Response:
    """A binary answer of one tensor with ``scalars`` in its metadata, as the server writes it."""
    content = write_safetensors({"w": torch.zeros(2)}, bodies.text_metadata(scalars))
    return httpx.Response(200, content=content,
                          headers={"content-type": "application/octet-stream"})


@pytest.mark.parametrize("step_id", ["3724374092893853", "0000000000000001", "1234e56789012345",
                                     "9f2c0a11b2c3d4e5"])
def test_an_evaluation_question_reaches_the_sdk_with_its_ids_as_sent(step_id: str) -> None:
    question = optserve._api._parse_evaluation(answer({
        "needs": "evaluation", "step_id": step_id, "evaluation": f"{step_id}.1",
        "evaluations": 1, "version": 3, "step": 3, "timeout_s": 60.0}))
    assert isinstance(question, optserve._api.EvaluationRequest)
    assert (question.step_id, question.evaluation) == (step_id, f"{step_id}.1")
    assert (question.evaluations, question.version, question.step) == (1, 3, 3)


def test_strings_that_read_as_json_come_back_as_strings() -> None:
    scalars: dict[str, object] = {
        "digits": "123", "float": "3724374092893853.1", "true": "true", "null": "null",
        "quoted": '"x"', "list": "[1]", "word": "evaluation", "number": 1.5, "count": 7,
        "flag": False, "rows": [2, 3]}
    meta = bodies.text_metadata(scalars)
    assert meta["word"] == "evaluation" and meta["count"] == "7"  # bare words and JSON as ever
    read = {}
    for k, v in meta.items():  # the clients' reading
        try:
            read[k] = json.loads(v)
        except ValueError:
            read[k] = v
    assert read == scalars


def test_step_ids_never_read_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [evaluations.new_step_id() for _ in range(2000)]
    monkeypatch.setattr(evaluations.secrets, "token_hex", lambda n: "3724374092893853")
    ids.append(evaluations.new_step_id())
    assert ids[-1] != "3724374092893853"
    for step_id in ids:
        assert re.fullmatch(r"[a-f][0-9a-f]{15}", step_id), step_id
        with pytest.raises(ValueError):
            json.loads(step_id)
        with pytest.raises(ValueError):
            json.loads(f"{step_id}.1")
    assert len(set(ids[:-1])) == 2000
