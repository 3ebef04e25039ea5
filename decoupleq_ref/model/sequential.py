"""``decoupleq run``: the paper's full procedure, block by block (true-sequential).

For each decoder block, in order:

1. its inputs X are the outputs of the already-quantized prefix on the calibration windows;
2. the float block's outputs Y = block_fp(X) are kept as the block-wise target (or, with
   float targets, the float model's own hidden states after the block, carried alongside X);
3. its linears are solved layer-wise in the official order (q/k/v → o → gate/up → down), each
   group's H = XᵀX/N captured after the previous groups were quantized;
4. the block-wise stage (blockwise.py) trains (s, z) and the norm weights towards Y; the block
   keeps the trained state only if its output loss dropped, else it tries again from the
   layer-wise state at a tenth of the rate (``retries`` times) or keeps the layer-wise state;
5. the block is committed to the checkpoint (one atomic file) and its weights are set from what
   was committed, so a resumed run continues from exactly the same state.

Then the model-level stage (model_stage.py), when on, trains every (s, z) and norm weight
towards the float model's next-token distribution and is committed as one more unit.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..backends import Solver
from ..config import QuantConfig
from ..objective import layer_loss
from .blockwise import call_block, norm_parameters, output_mse, train_block
from .calibrate import HessianHooks, StopForward
from .checkpoint import CheckpointWriter, dequantized_weight, packed_layer, stored_layer
from .model_stage import TeacherHead, train_model
from .progress import log, progress_bar
from .stage_times import StageTimes
from .torch_model import find_linears, layer_matrix, model_device, set_layer_matrix
from .train_config import BlockwiseConfig, ModelStageConfig, retry_rates

#: Official true-sequential order within a Llama block; names not listed form a last group.
LLAMA_GROUPS = (("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj",),
                ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"MODEL: `run` needs a Llama-family decoder (model.model.layers), got "
                         f"{type(model).__name__}; use `calibrate` + `quantize` for other architectures")
    return layers


def block_inputs(model: nn.Module, windows: np.ndarray) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every window, (n, seqlen, d), and the keyword arguments
    the model passes to its blocks (rotary embeddings, mask, positions: equal for all windows)."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise StopForward

    handle = decoder_blocks(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = model_device(model)
    try:
        with torch.no_grad():
            for w in windows:
                try:
                    model(input_ids=torch.from_numpy(w)[None].to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured[0][1].items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    return torch.cat([c[0] for c in captured]), kwargs


def forward_block(block: nn.Module, X: torch.Tensor, kwargs: dict, batch: int = 8) -> torch.Tensor | None:
    """block(X) in batches of windows, no grad; None when a hook ended the passes early."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(X), batch):
            try:
                outs.append(call_block(block, X[i:i + batch], kwargs))
            except StopForward:
                pass
    return torch.cat(outs) if len(outs) * batch >= len(X) else None


def linear_groups(names: list[str]) -> list[list[str]]:
    groups = [[n for n in g if n in names] for g in LLAMA_GROUPS]
    rest = [n for n in names if not any(n in g for g in groups)]
    return [g for g in groups if g] + ([rest] if rest else [])


def block_unit(i: int) -> str:
    return f"block.{i:04d}"


def apply_unit(block: nn.Module, prefix: str, tensors: dict[str, np.ndarray], info: dict, bits: int,
               group_size: int) -> None:
    """Set a block's linears (dequantized) and norm weights from its committed unit."""
    for name, layer in info["layers"].items():
        set_layer_matrix(block.get_submodule(name.removeprefix(prefix)),
                         dequantized_weight(tensors, name, layer, bits, group_size))
    own = dict(block.named_parameters())
    with torch.no_grad():
        for key in info["norms"]:
            own[key.removeprefix(prefix)].copy_(torch.from_numpy(tensors[key]))


def restore_norms(block: nn.Module, start: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, p0 in zip(norm_parameters(block), start):
            p.copy_(p0)


def quantize_block(block: nn.Module, prefix: str, X: torch.Tensor, kwargs: dict, cfg: QuantConfig, solve: Solver,
                   blockwise: BlockwiseConfig, seed: int, target: torch.Tensor | None = None,
                   times: StageTimes | None = None) -> tuple[dict[str, np.ndarray], dict, torch.Tensor | None]:
    """Steps 2-4 for one block: returns the unit's tensors, its info (per-layer losses on their H)
    and, when the block-wise stage measured it, the block's output on X in the kept state (the
    next block's input; None: the caller computes it). ``target``: the block-wise stage's Y when
    it is not the float block on X (float targets).

    Both states the stage compares are measured as they will be committed: the linears' weights
    dequantized from the stored float32 (s, z), in float32, whatever the training precision."""
    times = times or StageTimes()
    linears = find_linears(block)
    epochs = blockwise.epochs if blockwise.on else 0
    Y = target
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, dict] = {}
    hessians: dict[str, np.ndarray] = {}
    quant: dict[str, tuple] = {}
    weights: dict[str, np.ndarray] = {}
    for g, group in enumerate(linear_groups(list(linears))):
        # the first group's pass runs the float block: its outputs are the block-wise target Y;
        # other passes stop once the group's inputs are captured
        want_y = g == 0 and epochs > 0 and Y is None
        hooks = HessianHooks({n: linears[n] for n in group}, stop_when_done=not want_y)
        try:
            with times("capture"):
                out = forward_block(block, X, kwargs)
        finally:
            hooks.remove()
        Y = out if want_y else Y
        for name, H in hooks.hessians().items():
            W = layer_matrix(linears[name])
            with times("solve"):
                res = solve(W, H, cfg)
            t, info = stored_layer(prefix + name, res, W, H, False)
            tensors.update(t)
            layers[prefix + name] = {**info, "loss_layerwise": info["loss"]}
            hessians[name], weights[name] = H, W
            branch = (t[f"{prefix}{name}.hp_index"], t[f"{prefix}{name}.hp_weight"]) if info["hp_channels"] else None
            quant[name] = (res.q, t[f"{prefix}{name}.scales"], t[f"{prefix}{name}.zeros"], branch)
            set_layer_matrix(linears[name], dequantized_weight(t, prefix + name, info, cfg.bits, cfg.group_size))
    stage = {"epochs": epochs}
    out = None
    if epochs > 0:
        if Y is None:  # a block without linears
            with times("capture"):
                Y = forward_block(block, X, kwargs)
        with times("blockwise loss"):
            before = output_mse(forward_block(block, X, kwargs), Y)
        norms_start = [p.detach().clone() for p in norm_parameters(block)]
        steps = 0
        for attempt, lr in enumerate(retry_rates(blockwise.lr, blockwise.retries)):
            if attempt:  # the loss rose: start over from the layer-wise state at a tenth of the rate
                restore_norms(block, norms_start)
            r = train_block(block, quant, X, Y, kwargs, replace(blockwise, lr=lr), seed, times)
            steps += r.steps
            trained = dict(tensors)
            for name in quant:
                trained[f"{prefix}{name}.scales"], trained[f"{prefix}{name}.zeros"] = r.scales[name], r.zeros[name]
                set_layer_matrix(linears[name], dequantized_weight(trained, prefix + name, layers[prefix + name],
                                                                   cfg.bits, cfg.group_size))
            with times("blockwise loss"):
                out = forward_block(block, X, kwargs)
                after = output_mse(out, Y)
            if after < before:
                break
        if after < before:
            tensors = trained
            for name in quant:
                layer = layers[prefix + name]
                W_hat = packed_layer(tensors, prefix + name, layer, cfg.bits, cfg.group_size).dequantize()
                layer["loss"] = layer_loss(weights[name], W_hat, hessians[name])
        else:  # back to the layer-wise state
            out = None
            for name in quant:
                set_layer_matrix(linears[name], dequantized_weight(tensors, prefix + name, layers[prefix + name],
                                                                   cfg.bits, cfg.group_size))
            restore_norms(block, norms_start)
        stage.update(loss_before=before, loss_after=after, steps=steps, lr_used=lr,
                     kept="trained" if after < before else "layer-wise")
    norms = {}
    for key, p in block.named_parameters():
        if any(p is q for q in norm_parameters(block)):
            norms[prefix + key] = p.detach().cpu().numpy().copy()
    tensors.update(norms)
    return tensors, {"layers": layers, "norms": sorted(norms), "blockwise": stage}, out


def unique_state(model: nn.Module, skip: set[str]) -> dict[str, np.ndarray]:
    """state_dict as numpy without ``skip`` and without second names of tied tensors."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        if k in skip or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().cpu().numpy().copy()
    return out


MODEL_UNIT = "model-stage"


def model_stage_quant(loaded: list[tuple[dict, dict]], bits: int, group_size: int) -> dict[str, tuple]:
    """name → (q, s, z, branch) of every committed layer, from the block units as loaded."""
    quant = {}
    for tensors, info in loaded:
        for name, layer in info["layers"].items():
            packed = packed_layer(tensors, name, layer, bits, group_size)
            branch = (packed.hp_index, packed.hp_weight) if packed.hp_channels else None
            quant[name] = (packed.codes(), packed.scale, packed.zero, branch)
    return quant


def run_model(model: nn.Module, windows: np.ndarray, cfg: QuantConfig, solve: Solver, writer: CheckpointWriter,
              blockwise: BlockwiseConfig, seed: int, times: StageTimes | None = None,
              model_stage: ModelStageConfig | None = None) -> dict:
    """Quantize every decoder block in order, then the model-level stage when ``model_stage`` is
    on (see module docstring); returns the checkpoint config. ``times`` (optional) collects the
    wall time per stage."""
    times = times or StageTimes()
    blocks = decoder_blocks(model)
    model.config.use_cache = False
    with times("capture"):
        X, kwargs = block_inputs(model, windows)
    # the float model's hidden states, carried through every (still float) block: the block-wise
    # stage's float targets, and the model-level stage's teacher
    float_targets = blockwise.on and blockwise.targets == "float"
    model_stage = model_stage if model_stage is not None and model_stage.on else None
    X_fp = X.clone() if float_targets or model_stage else None
    layers: dict[str, dict] = {}
    reports: list[dict] = []
    loaded: list[tuple[dict, dict]] = []  # the committed block units, for the model-level stage
    units = []
    with progress_bar("run (blocks)", len(blocks)) as advance:
        for i, block in enumerate(blocks):
            unit, prefix = block_unit(i), f"model.layers.{i}."
            t0 = time.perf_counter()
            Y_fp = None
            if X_fp is not None:  # the block is still float here, resumed or not
                with times("propagate"):
                    Y_fp = forward_block(block, X_fp, kwargs)
            X_next = None
            if not writer.done(unit):
                tensors, info, X_next = quantize_block(block, prefix, X, kwargs, cfg, solve, blockwise, seed + i,
                                                       Y_fp if float_targets else None, times)
                with times("commit"):
                    writer.commit(unit, tensors, info)
            with times("commit"):
                tensors, info = writer.load(unit)
                apply_unit(block, prefix, tensors, info, cfg.bits, cfg.group_size)
            if X_next is None:  # else: the stage's last measurement, in exactly this (committed) state
                with times("propagate"):
                    X_next = forward_block(block, X, kwargs)
            X = X_next
            X_fp = Y_fp
            units.append(unit)
            if model_stage:
                loaded.append((tensors, info))
            layers.update(info["layers"])
            stage = info["blockwise"]
            reports.append({"block": i, **stage})
            note = f"block {i}"
            if "loss_before" in stage:  # the stage's loss, and which state the block kept (the lower loss)
                note += f": loss {stage['loss_before']:.3g} → {stage['loss_after']:.3g}"
                retried = stage.get("lr_used", blockwise.lr) != blockwise.lr
                note += f" (retried at lr {stage['lr_used']:.3g})" if retried else ""
                note += ", kept the layer-wise result" if stage.get("kept") == "layer-wise" else ""
            note += f" ({time.perf_counter() - t0:.0f}s)"
            log(note)
            advance(note=note)
    extra: dict = {"blockwise": reports}
    if model_stage:
        if not writer.done(MODEL_UNIT):
            quant = model_stage_quant(loaded, cfg.bits, cfg.group_size)
            log(f"model-level stage: {len(quant)} layers, {model_stage.epochs} epoch(s) of {len(windows)} windows")
            r = train_model(model, quant, windows, X_fp, TeacherHead(model), model_stage, seed, times)
            with times("commit"):
                writer.commit(MODEL_UNIT, r.tensors, {"kl_before": r.kl_before, "kl_after": r.kl_after,
                                                      "kl_windows": r.kl_windows, "steps": r.steps, "kept": r.kept,
                                                      "lr_used": r.lr})
        with times("commit"):
            tensors, info = writer.load(MODEL_UNIT)
            own = dict(model.named_parameters())
            with torch.no_grad():
                for key, value in tensors.items():
                    if key in own:  # norm weights; the linears' (s, z) go to the checkpoint only
                        own[key].copy_(torch.from_numpy(value))
        units.append(MODEL_UNIT)
        extra["model_stage"] = {**model_stage.settings(), **info}
        log(f"model-level stage: KL {info['kl_before']:.4g} → {info['kl_after']:.4g}"
            + (", kept the block-wise result" if info["kept"] != "trained" else ""))
        if info["kept"] == "trained":  # (s, z) moved after the layer losses were measured
            for layer in layers.values():
                layer["loss_at"] = "block stage"
    other = unique_state(model, {f"{n}.weight" for n in layers})
    return writer.finalize(units, other, layers, extra)
