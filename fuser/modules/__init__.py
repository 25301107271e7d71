"""Module-level rewriting: `convert`, the fused-module swap, module graphs, hand-written MoE blocks."""
