"""The training layer: the two-phase trainer and everything a run needs while it trains.

Owns the orchestration (`trainer`), the phases (`phases`), the record of progress
and resume (`run_state`), checkpoints, callbacks, the phase-1 feature cache,
TensorBoard summaries, the runtime (device, precision, XLA, steps per call) and the
distribution strategies.

May import: the core modules, `effpipe.data`, `effpipe.model` and `effpipe.outputs`.
`cluster` imports no TensorFlow, so the binary can read TF_CONFIG before it loads.
"""
