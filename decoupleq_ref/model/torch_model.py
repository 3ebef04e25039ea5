"""Torch side of the pipeline: load a model, find its linears, put checkpoint weights back."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..matmul import PackedLayer
from .checkpoint import model_state, packed_layer, read_checkpoint_tensors
from .source import ModelSource


#: transformers modules that draw their own tqdm bar outside transformers' switch
#: (logging.disable_progress_bar): the GGUF loader's "Converting and de-quantizing GGUF tensors".
RAW_TQDM_MODULES = ("transformers.modeling_gguf_pytorch_utils",)


def quiet_transformers() -> None:
    """No download/loading/saving progress bars or load reports from transformers: our own bars
    (progress.progress_bar) and errors say what happens. Idempotent."""
    import importlib

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    for module_name in RAW_TQDM_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # the GGUF loader needs the gguf package
            continue
        bar = getattr(module, "tqdm", None)
        if bar is not None and not getattr(bar, "silenced", False):
            module.tqdm = silenced_tqdm(bar)


def silenced_tqdm(bar: type) -> Callable:
    """``bar`` (a tqdm class) that always starts disabled; iterating it still yields every item."""
    def silent(*args, **kwargs):
        return bar(*args, **{**kwargs, "disable": True})

    silent.silenced = True
    return silent


def model_class(source: ModelSource) -> type:
    """The class the model was saved as (config.json ``architectures``), so parameter names
    match the saved tensors; GGUF files are Llama-family causal LMs."""
    import transformers

    if source.is_gguf:
        return transformers.AutoModelForCausalLM
    try:
        config = transformers.AutoConfig.from_pretrained(source.folder)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"MODEL: unsupported or unreadable config.json in {source.folder} ({e})") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return cls if cls is not None else transformers.AutoModel


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def torch_device(name: str = "auto") -> torch.device:
    """The torch device of ``--device``: ``auto`` is the first CUDA GPU when torch sees one, else
    the CPU. Only where the model runs (forward passes, H sums, the block-wise stage); the layer
    solver's backend is chosen separately (--backend)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {name!r} is not a device; choose one of {', '.join(DEVICES)}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {name!r} is not supported; choose one of {', '.join(DEVICES)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA GPU"
            raise ValueError(f"--device: {name!r} asked for, but torch sees no GPU ({build}); "
                             "pass --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {name!r}, but torch sees {torch.cuda.device_count()} GPU(s); "
                             "pass cuda:0 ... or auto")
    return device


def deterministic_on(device: torch.device) -> None:
    """Same inputs and settings → the same bits on a GPU as well: block-wise gradients feed the
    next block's H and so its integers. cuBLAS gets a fixed workspace (read when its first handle
    is made: call before any CUDA work) and torch deterministic kernels only, so an op without
    one raises instead of drifting from run to run."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a GPU torch calls bf16-capable, or a CPU with
    AVX-512-BF16 or AMX (elsewhere autocast emulates it, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                  "_is_amx_tile_supported"))


def training_precision(name: str, device: torch.device) -> str:
    """``--train-precision``: ``auto`` is bf16 where the device computes it natively, else fp32."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are: its inputs go there."""
    return next(model.parameters()).device


def load_model(source: ModelSource, causal: bool = False, device: torch.device | str = "cpu"
               ) -> tuple[nn.Module, object]:
    """(float32 model in eval mode on ``device``, tokenizer), as the class it was saved as.
    ``causal``: the command needs next-token logits (eval, run); other architectures get a
    clear error. On a CUDA device this switches torch to deterministic kernels for the whole
    process (deterministic_on)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    device = torch.device(device)
    deterministic_on(device)
    kw = {"gguf_file": source.gguf_file} if source.is_gguf else {}
    cls = model_class(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"MODEL: cannot load a tokenizer from {source.describe()} ({e}); "
                         "save the tokenizer next to the model (tokenizer.save_pretrained)") from None
    try:
        model = cls.from_pretrained(source.folder, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"MODEL: cannot load {source.describe()} as {cls.__name__} ({e}); "
                         "unsupported architecture or damaged files") from None
    except Exception as e:  # noqa: BLE001 — only the weight-file failures below, re-raised otherwise
        if not unreadable_weights(e):
            raise
        raise ValueError(f"MODEL: the weight files in {source.describe()} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]}); re-download the model, or re-save it with "
                         "save_pretrained(..., safe_serialization=True)") from None
    if causal and model.get_output_embeddings() is None:
        raise ValueError(f"MODEL: {source.describe()} is a {type(model).__name__}, not a causal language "
                         "model; this command needs next-token logits (calibrate + quantize work for it)")
    return model.to(device).eval(), tokenizer


def unreadable_weights(e: Exception) -> bool:
    """A damaged or refused weight file: a pickled .bin torch's safe unpickler rejects, a truncated
    zip archive, a SafetensorError (none of them an OSError)."""
    import pickle

    return (isinstance(e, (pickle.UnpicklingError, EOFError)) or type(e).__name__ == "SafetensorError"
            or (isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e)))


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def find_linears(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D by module name, except the output head and any layer whose weight
    is tied to the input embedding (both stay in float, as in GPTQ and decoupleQ)."""
    skip: set[int] = set()
    for get in ("get_output_embeddings", "get_input_embeddings"):
        emb = getattr(model, get, lambda: None)()
        if emb is not None and getattr(emb, "weight", None) is not None:
            skip.add(id(emb.weight))
    return {f"{prefix}{name}": m for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_conv1d(m)) and id(m.weight) not in skip}


def layer_matrix(module: nn.Module) -> np.ndarray:
    """W (out, in) in float64, whatever the module's storage orientation."""
    w = module.weight.detach().to("cpu", torch.float64)
    return (w.T if is_conv1d(module) else w).numpy().copy()


def set_layer_matrix(module: nn.Module, W_hat: np.ndarray) -> None:
    """Replace a linear's weight by Ŵ (out, in), cast to the module's dtype."""
    w = torch.from_numpy(np.ascontiguousarray(W_hat.T if is_conv1d(module) else W_hat))
    with torch.no_grad():
        module.weight.copy_(w.to(module.weight.dtype))


def load_state(model: nn.Module, state: dict[str, np.ndarray], arg: str = "folder") -> None:
    """Copy a name → array state into the model; ValueError naming ``arg`` (the checkpoint's
    argument: ``folder`` in the API, ``--quantized`` on the command line) if a name or shape does
    not fit. Tensors that are non-persistent buffers of the model (e.g. BERT's
    ``embeddings.position_ids``, written to older files but no longer saved by transformers) are
    skipped, as from_pretrained skips them: the model computes its own."""
    own = model.state_dict()
    not_persisted = {name for name, _ in model.named_buffers()} - set(own)
    unknown = sorted(set(state) - set(own) - not_persisted)
    if unknown:
        raise ValueError(f"{arg}: tensors {unknown[:3]} are not in the model; the checkpoint was made "
                         "from another model: pass the same MODEL as for quantize/run")
    with torch.no_grad():
        for k, v in state.items():
            if k in not_persisted:
                continue
            if tuple(own[k].shape) != v.shape:
                raise ValueError(f"{arg}: {k} is {v.shape} in the checkpoint but {tuple(own[k].shape)} "
                                 "in the model; pass the same MODEL as for quantize/run")
            own[k].copy_(torch.from_numpy(np.ascontiguousarray(v)).to(own[k].dtype))


class PackedLinear(nn.Module):
    """Inference-only linear y = x Ŵᵀ + b computed from the packed layer by a packed-matmul kernel
    (``matmul(x (batch, in) float32, PackedLayer) -> (batch, out)``): kernels_numba.packed_matmul
    by default, decoupleq_ref.matmul as the float64 reference. Ŵ is never materialised."""

    def __init__(self, layer: PackedLayer, bias: torch.Tensor | None, matmul: Callable) -> None:
        super().__init__()
        self.layer, self.matmul = layer, matmul
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32).numpy()
        y = torch.from_numpy(np.asarray(self.matmul(flat, self.layer), dtype=np.float32)).to(x.device)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return (y if self.bias is None else y + self.bias.to(x.device)).to(x.dtype)


def packed_kernel() -> Callable:
    """The fastest installed packed matmul: kernels_numba's, else the NumPy reference."""
    from ..backends import backend_available

    if backend_available("numba"):
        from kernels_numba import packed_matmul

        return packed_matmul
    from ..matmul import matmul

    return matmul


def load_quantized(model: nn.Module, folder, packed: bool = False, matmul: Callable | None = None,
                   arg: str = "folder") -> dict:
    """Put a checkpoint into a transformers model; returns its config. Default: dequantized float
    weights. ``packed``: the quantized linears become PackedLinear modules running ``matmul``
    (default packed_kernel()) on the stored codes, for true-quant inference. Errors name ``arg``
    (the CLI passes ``--quantized``)."""
    config, tensors = read_checkpoint_tensors(folder, arg)
    load_state(model, model_state(config, tensors), arg)
    if packed:
        kernel = matmul or packed_kernel()
        for name, layer in config["layers"].items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            pl = packed_layer(tensors, name, layer, config["bits"], config["group_size"])
            setattr(parent, child, PackedLinear(pl, old.bias, kernel))
    return config
