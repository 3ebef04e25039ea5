"""Model-level commands (calibrate, quantize, run, eval, demo): see issue #5."""
