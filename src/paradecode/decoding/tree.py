"""Token trees: the shape every draft takes, flattened for one verification call.

A :class:`Draft` is a tree of candidate tokens hanging below the *root*, the
last committed token (whose key/value is not cached yet). Nodes are stored in
topological order (a parent before its children); ``parents[i] == -1`` means
node ``i`` is a child of the root. A chain is the tree where node ``i`` is the
child of node ``i - 1``.

For verification the tree is flattened into one sequence
``[root, node_0, ..., node_{n-1}]`` (SpecInfer, Miao et al. 2024; Medusa,
Cai et al. 2024): each entry attends to the cached prefix, the root, its own
ancestors and itself (:func:`tree_attention_mask`), and its position id is the
prefix length plus its depth (:func:`tree_positions`), so siblings share a
position exactly as if each path had been fed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Draft:
    """Candidate tokens as a tree below the last committed token.

    ``q`` holds, for each node, the draft distribution (V,) the node was drawn
    from given its path and its earlier siblings, processed with the same
    temperature/top-k/top-p as the target; ``None`` for deterministic drafts
    (lookups), which the verifier treats as one-hot.
    """

    tokens: list[int]
    parents: list[int]
    q: torch.Tensor | None = None   # (n, V) float32 or None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a draft needs one parent per token")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come first (topological order)")
        if self.q is not None and self.q.shape[0] != len(self.tokens):
            raise ValueError("q needs one row per draft node")

    @classmethod
    def chain(cls, tokens: list[int], q: torch.Tensor | None = None) -> "Draft":
        """A linear draft: node i is the child of node i - 1."""
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q)

    @classmethod
    def empty(cls) -> "Draft":
        """No candidates: the verification call is a plain decoding step."""
        return cls([], [])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        """Number of nodes on the longest root-to-leaf path (0 for an empty draft)."""
        return max(node_depths(self.parents), default=0)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.parents) - 1))

    @property
    def chain_prefix(self) -> int:
        """How many leading nodes form a chain below the root (node i the child of node i - 1).

        Flattened for verification, these nodes sit exactly where a chain call would put
        them, see the same keys at the same cache slots and so get the logits of plain
        decoding bit for bit; any other node's attention sums its keys in another order.

        >>> Draft([5, 6, 7, 8], [-1, 0, 1, 0]).chain_prefix
        3
        """
        k = 0
        while k < len(self.parents) and self.parents[k] == k - 1:
            k += 1
        return k

    def preorder(self) -> "Draft":
        """The same tree with its nodes in depth-first pre-order, each node's children in draft order.

        A drafter lists a node's likeliest child first, so this lays the likeliest path out
        as the longest possible :attr:`chain_prefix`.

        >>> d = Draft([1, 2, 3, 4], [-1, -1, 0, 1]).preorder()
        >>> d.tokens, d.parents
        ([1, 3, 2, 4], [-1, 0, -1, 2])
        """
        return self.select(preorder_order(self.parents))

    def select(self, nodes: list[int]) -> "Draft":
        """The draft of ``nodes``, in that order, parent indices renumbered; every kept node's parent must be
        kept and listed before it (a prefix of the draft order, a pre-order)."""
        if nodes == list(range(len(self))):
            return self
        new_index = {old: new for new, old in enumerate(nodes)}
        parents = [-1 if self.parents[i] == -1 else new_index[self.parents[i]] for i in nodes]
        q = None if self.q is None else self.q[nodes]
        return Draft([self.tokens[i] for i in nodes], parents, q)

    def then(self, below: "Draft") -> "Draft":
        """This draft followed by ``below``: ``below``'s top-level nodes become children of this draft's last node.

        Meant for a chain followed by a tree (a carried prefix, then a fresh draft); a
        side without ``q`` gets one-hot rows when the other has them.

        >>> d = Draft.chain([4, 5]).then(Draft([6, 7], [-1, -1]))
        >>> d.tokens, d.parents
        ([4, 5, 6, 7], [-1, 0, 1, 1])
        """
        if not self.tokens:
            return below
        if not below.tokens:
            return self
        n = len(self)
        parents = self.parents + [n - 1 if p == -1 else p + n for p in below.parents]
        q = None
        if self.q is not None or below.q is not None:
            vocab = (self.q if self.q is not None else below.q).shape[-1]
            q = torch.cat([d.q if d.q is not None else F.one_hot(torch.tensor(d.tokens), vocab).float()
                           for d in (self, below)])
        return Draft(self.tokens + below.tokens, parents, q)

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (-1 = the root), in draft order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def truncate(self, max_nodes: int, max_depth: int | None = None) -> "Draft":
        """Keep the first ``max_nodes`` nodes no deeper than ``max_depth`` (still a valid tree).

        Dropping deep nodes keeps every parent (parents are shallower), and a
        prefix of a topological order is closed under parents, so the result
        is a tree; parent indices are renumbered.
        """
        depths = node_depths(self.parents)
        keep = [i for i in range(len(self)) if max_depth is None or depths[i] <= max_depth][:max(0, max_nodes)]
        return self.select(keep)


def preorder_order(parents: list[int]) -> list[int]:
    """The nodes of a tree in depth-first pre-order, each node's children in draft order:
    ``preorder_order(d.parents)[i]`` is the node of ``d`` that ``d.preorder()`` puts at position i.

    >>> preorder_order([-1, -1, 0, 1])
    [0, 2, 1, 3]
    """
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
    order: list[int] = []
    stack = list(reversed(kids.get(-1, [])))
    while stack:
        i = stack.pop()
        order.append(i)
        stack.extend(reversed(kids.get(i, [])))
    return order


def node_depths(parents: list[int]) -> list[int]:
    """Depth of each node: 1 for children of the root.

    >>> node_depths([-1, 0, -1, 1])
    [1, 2, 1, 3]
    """
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p == -1 else depths[p] + 1)
    return depths


def path_to(node: int, parents: list[int]) -> list[int]:
    """Node indices from the root's child down to ``node`` (empty for the root, -1).

    >>> path_to(3, [-1, 0, -1, 1])
    [0, 1, 3]
    """
    path = []
    while node != -1:
        path.append(node)
        node = parents[node]
    return path[::-1]


def tree_attention_mask(parents: list[int]) -> torch.Tensor:
    """(n+1, n+1) bool mask over [root, node_0..node_{n-1}]: True = may attend.

    Row ``i + 1`` (node i) is the row of its parent plus itself, i.e. the root,
    its ancestors and itself (EAGLE-2: ``tree_mask[i] |= tree_mask[parent]``).
    For a chain this is the causal mask.

    >>> tree_attention_mask([-1, -1, 0]).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    """
    n = len(parents)
    mask = torch.eye(n + 1, dtype=torch.bool)                    # (n+1, n+1)
    for i, p in enumerate(parents):
        mask[i + 1] |= mask[p + 1]
    return mask


def tree_positions(parents: list[int], start: int) -> torch.Tensor:
    """(n+1,) position ids: ``start`` for the root, ``start + depth`` for each node.

    >>> tree_positions([-1, -1, 0], 10).tolist()
    [10, 11, 11, 12]
    """
    return torch.tensor([start] + [start + d for d in node_depths(parents)], dtype=torch.long)
