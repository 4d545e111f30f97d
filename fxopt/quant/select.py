"""Which layers a quantization scheme touches: names, module paths and glob patterns.

A pattern matches a node by its graph name (``conv_1``), its module path as recorded at
capture (``layer1.0.conv1``) or a glob over either (``blocks.*.attn.*``). The same
patterns serve ``skip=[...]`` and the sensitivity report.

Example::

    layer_name(node)                       # "layer1.0.conv1" (or the node name)
    matches(node, ["layer1.*", "fc"])      # True / False
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch.fx as fx


def layer_name(node: fx.Node) -> str:
    """The name a user knows a layer by: its module path, else the node name.

    >>> layer_name(node)  # doctest: +SKIP
    'layer1.0.conv1'
    """
    path = node.meta.get("fxopt_module_path")
    if path:
        return str(path)
    return str(node.target) if node.op == "call_module" else node.name


def matches(node: fx.Node, patterns: Iterable[str]) -> bool:
    """True if ``node``'s layer name or node name equals or glob-matches a pattern.

    >>> matches(node, ["layer1.*"])  # doctest: +SKIP
    True
    """
    names = {layer_name(node), node.name}
    if node.op == "call_module":
        names.add(str(node.target))
    return any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns for n in names)
