"""Any left metric with any right metric, e.g. GFWSVD's output factor × the SVD-LLM input Gram."""

from stagepipe.methods.base import Method


class Mixed(Method):
    name = "mixed"

    def pair(self) -> tuple[str, str]:
        return self.cfg.left, self.cfg.right
