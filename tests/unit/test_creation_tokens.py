"""Creation tokens (the second half of a state tag, ``"r<revision>.<token>"``): each session
object made or restored mints its own, and a sharded session's changes whenever any of its
shards' does (a shard restored alone, on its own host, must not leave its session's tag
matching)."""

from __future__ import annotations

import torch

from app.engine import creation_tokens
from app.engine.interface import GroupSpec
from app.engine.session import Session


def test_a_token_has_64_random_bits_and_each_session_object_its_own() -> None:
    tokens = {creation_tokens.minted() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in tokens)
    made = Session.build("s", "SGD", [GroupSpec({"w": torch.zeros(2)}, {})], {"lr": 0.1},
                         None, "error", torch.device("cpu"))
    restored = Session.restore(made.snapshot_tree(), torch.device("cpu"))
    assert (restored.version, restored.revision) == (made.version, made.revision)
    assert made.token != restored.token
    assert made.describe().token == made.token
    assert made.describe() == restored.describe()  # (the token is not compared)


def test_a_sharded_sessions_token_changes_with_any_shards() -> None:
    shards = [creation_tokens.minted() for _ in range(3)]
    joined = creation_tokens.joined(shards)
    assert len(joined) == 16 and joined not in shards
    assert creation_tokens.joined(list(shards)) == joined
    for i in range(3):
        changed = [*shards[:i], creation_tokens.minted(), *shards[i + 1:]]
        assert creation_tokens.joined(changed) != joined, i
    assert creation_tokens.joined(shards[::-1]) != joined  # (in shard order)
    assert creation_tokens.joined(shards[:1]) == shards[0]
