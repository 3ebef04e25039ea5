"""Model-level pipeline: calibrate → quantize / run → checkpoint → eval.

Torch-free modules (safe for ``decoupleq quantize``): source, weights, stats, checkpoint,
quantize, atomic, lock, safefiles, progress. Torch modules (imported only by the commands that need torch):
torch_model, text, calibrate, sequential, blockwise, evaluate, tiny.

Public entry points: checkpoint.read_checkpoint (torch-free reader → PackedLayers),
torch_model.load_quantized (into a transformers model, dequantized or packed), the CLI commands
in decoupleq_ref/cli_model.py.
"""
