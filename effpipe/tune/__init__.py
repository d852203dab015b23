"""The tune layer: the batch-size tuner against a memory budget.

Owns the search over batch sizes (`search`), the analytical memory estimate
(`memory`) and the tuner's trials of the real train step (`tuner`).

May import: every layer below it (core, data, model, outputs, training).
"""
