"""Method ``none``: the unquantized base model, as loaded. The reference every other row is compared with.

Sample yaml::

    jobs:
      - {kind: quantize, method: none}
"""

from __future__ import annotations


class Reference:
    def quantize(self, ctx, base) -> None:
        return None  # nothing to write: the base folder is the artifact

    def load(self, ctx, artifact, base):
        return base.model
