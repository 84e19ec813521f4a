"""A node's dotted path in a tree a client sent (``state_dict.state.0.exp_avg``), kept as a
link to its parent and its own key, and written out only when asked (``str``): when an
error names it.

The walks over a client's state dict, options or ``torch.save`` file used to write every
node's path as it met the node (``f"{path}.{key}"``): a path is as long as the keys above it,
so a body of one long key over a long list (``{"k" * 20000: [0] * 100000}``, 220 KB) made
100,000 paths of 20 KB, 2 GB held at once (a 300 KB one, 6 GB: the server out of memory),
and a tree nested a million levels (a ``torch.save`` file of 2 MB) paths of up to 2 MB each,
a minute of CPU. A node's :class:`TreePath` is one small object whatever its depth."""

from __future__ import annotations


class TreePath:
    """The path of a node: its parent's and its own key (the root's: its text, as given;
    ``""`` for none, which the written path leaves out)."""

    __slots__ = ("_key", "_parent", "depth")

    def __init__(self, key: object, parent: TreePath | None = None) -> None:
        self._key = key
        self._parent = parent
        #: levels below the root (the root's is 0)
        self.depth: int = 0 if parent is None else parent.depth + 1

    @property
    def key(self) -> object:
        """This node's own key."""
        return self._key

    def child(self, key: object) -> TreePath:
        return TreePath(key, self)

    def keys(self) -> list[object]:
        """The keys from the root's to this node's."""
        out: list[object] = []
        node: TreePath | None = self
        while node is not None:
            out.append(node._key)
            node = node._parent
        out.reverse()
        return out

    def top(self) -> object:
        """The key of this node's ancestor right below the root (its own key there; None
        for the root)."""
        node = self
        if node._parent is None:
            return None
        while node._parent is not None and node._parent._parent is not None:
            node = node._parent
        return node._key

    def __str__(self) -> str:
        keys = self.keys()
        if keys[0] == "":
            keys = keys[1:]
        return ".".join(str(k) for k in keys)

    def __repr__(self) -> str:
        return f"TreePath({str(self)!r})"
