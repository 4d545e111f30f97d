"""Which layers a quantization scheme touches: names, module paths and glob patterns.

A pattern matches a node by its graph name (``conv_1``), its module path as recorded at
capture (``layer1.0.conv1``) or a glob over either (``blocks.*.attn.*``). The same
patterns serve ``skip=[...]``, ``keep_fp32=[...]`` and the sensitivity report. The
helpers live with the other shared graph helpers in fxopt/graph_utils.py.

Example::

    layer_name(node)                       # "layer1.0.conv1" (or the node name)
    matches(node, ["layer1.*", "fc"])      # True / False
"""

from __future__ import annotations

from fxopt.graph_utils import layer_name, matches

__all__ = ["layer_name", "matches"]
