"""``optserve._state_keys``: the keys the session's optimizer keeps per parameter (worked out
with torch's own class, compared here with a real local run of it) and the split of a state
dict's entries into the session's part and the client's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from optserve._state_keys import split_state, state_keys, torch_keys


def params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True),
            torch.randn(2, 2, 2, requires_grad=True)]


def kept_by_torch(name: str, options: dict[str, Any]) -> list[frozenset[str]]:
    """Each parameter's state keys after two steps of a local ``name`` with real gradients."""
    ps = params()
    opt = getattr(torch.optim, name)(ps, **options)
    for _ in range(2):
        opt.zero_grad()
        sum((p * p).sum() for p in ps).backward()  # type: ignore[union-attr]
        opt.step()
    return [frozenset(opt.state[p]) for p in ps]


@pytest.mark.parametrize("name, options", [
    ("Adam", {"lr": 0.1}), ("Adam", {"lr": torch.tensor(0.1), "amsgrad": True}),
    ("AdamW", {"lr": 0.1, "foreach": False}), ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}), ("Adafactor", {"lr": 0.01}),
    ("Adagrad", {"lr": 0.1}), ("ASGD", {"lr": 0.1}), ("Rprop", {"lr": 0.1}),
    ("RMSprop", {"lr": 0.1, "momentum": 0.5, "centered": True}), ("NAdam", {"lr": 0.1}),
])
def test_the_keys_are_those_torch_keeps(name: str, options: dict[str, Any]) -> None:
    ps = params()
    group = {**options, "lookahead_k": 3, "initial_lr": 0.1, "capturable": False}
    assert state_keys(name, [group], [ps]) == [kept_by_torch(name, options)]


def test_lbfgs_keeps_one_state_under_its_first_parameter() -> None:
    ps = params()
    keys = state_keys("LBFGS", [{"lr": 1}, {"lr": 1}], [ps[:2], ps[2:]])
    first = keys[0][0]
    assert first is not None and {"func_evals", "n_iter", "d", "old_dirs"} <= first
    assert keys[0][1:] + keys[1] == [frozenset(), frozenset()]


def test_what_cannot_be_worked_out_here_is_left_to_the_server() -> None:
    ps = params()
    assert state_keys("NoSuchOptimizer", [{}], [ps]) == [[None, None, None]]
    assert state_keys("Adam", [{"lr": -1.0}], [ps]) == [[None, None, None]]


def test_split_parts_each_entry() -> None:
    adam = frozenset({"step", "exp_avg", "exp_avg_sq"})
    t = torch.zeros(2)
    state: dict[Any, Any] = {
        0: {"step": t, "exp_avg": t, "exp_avg_sq": t, "lookahead_slow_buff": t},
        "1": {"lookahead_slow_buff": t},  # (a param id after a trip through JSON)
        2: {},
        3: {"step": t, "extra": 1},
        4: "not an entry",
    }
    session, client = split_state(state, {0: adam, 1: adam, 2: adam, 3: None, 4: adam})
    assert session == {0: {"step": t, "exp_avg": t, "exp_avg_sq": t}, 2: {},
                       3: {"step": t, "extra": 1}, 4: "not an entry"}
    assert client == {0: {"lookahead_slow_buff": t}, 1: {"lookahead_slow_buff": t}}
    assert client[0]["lookahead_slow_buff"] is t


def test_another_optimizers_keys_go_to_the_session() -> None:
    """SGD's ``momentum_buffer`` in an entry for an Adam session is no wrapper's key: it goes to
    the session (which refuses it), where ``lookahead_slow_buff`` stays here."""
    adam = frozenset({"step", "exp_avg", "exp_avg_sq"})
    t = torch.zeros(2)
    state: dict[Any, Any] = {0: {"momentum_buffer": t, "lookahead_slow_buff": t},
                             1: {"step": t, "square_avg": t}}
    session, client = split_state(state, {0: adam, 1: adam})
    assert session == {0: {"momentum_buffer": t}, 1: {"step": t, "square_avg": t}}
    assert client == {0: {"lookahead_slow_buff": t}}
    assert {"momentum_buffer", "exp_avg", "square_avg", "max_exp_avg_sq", "grad_avg",
            "old_dirs"} <= torch_keys()
