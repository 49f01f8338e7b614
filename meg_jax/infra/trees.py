"""Nested-dict parameter trees as flat `{"a/b/c": leaf}` maps (checkpoint keys, partition rules)."""

import jax


def flatten_tree(tree) -> dict[str, object]:
    """{'a/b/c': leaf} for a nested dict tree; a leading 'params' level is dropped."""
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return flat


def unflatten_tree(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree
