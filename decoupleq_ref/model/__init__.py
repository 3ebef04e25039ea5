"""Model-level pipeline (issue 5): calibrate → quantize / run → checkpoint → eval.

Torch-free modules (safe for ``decoupleq quantize``): source, weights, stats, checkpoint,
quantize, atomic, progress. Torch modules (imported only by the commands that need torch):
torch_model, text, calibrate, sequential, blockwise, evaluate.
"""
