"""The outputs layer: what people look at and use after training.

Owns the evaluation on the test split (top-1, top-5, per class), the plots, and the
serving export (`export`), plus re-evaluating an export on a dataset.

May import: the core modules, `effpipe.data` and `effpipe.model`.
"""
