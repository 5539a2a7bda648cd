"""Synthetic worlds with exact gold annotations: `shapes` (coloured shapes on a 2x2 grid)."""
