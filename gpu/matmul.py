"""Packed low-bit matmul on the device: y = x @ Ŵᵀ, Ŵ = s·q + z, straight from docs/FORMAT.md's
layout (no repacking: each row's bytes are read as little-endian uint32 words, word m holding
columns m·c … m·c + c − 1, c = 32/b codes, column m·c + r in bits [r·b, r·b + b)).

b ∈ {1, 2, 4, 8} (no code straddles a word); b = 3 is rejected with a ValueError. Activations
are fp16 or fp32, accumulation is fp32 and y is fp32.

* W2 quad GEMV (bits 2, fp16 x, batch ≤ 4, groups of whole 64-column quads, per-channel
  included): a lane per 16-byte quad of 4 words of each of its warp's rows, x read from global
  memory through the read-only cache (no shared staging, no block barrier in the loop). The
  load/convert/FMA step is linked CUDA C (gpu/packed_quad.cu, compiled by NVRTC) on a real GPU
  and its Python twin ``_w2_quad_step`` in the simulator; see ``gemv_quad_kernel``. The format
  stores scales and zeros as float32 (FORMAT.md), so they stay float32 here.
* GEMV (other batch ≤ 16): a warp per few output rows, a lane per word, so a warp reads 128
  contiguous bytes of each row's codes; the block stages the matching chunk of x in shared
  memory once for all its rows (one column of padding per word: no bank conflicts). When a
  group spans whole words (g a multiple of c) each word contributes s·Σ x·q + z·Σ x, one
  scale/zero load per word. One compiled kernel per (bits, batch): see ``gemv_kernel``.
* GEMM (batch > 16): tiles of x and of dequantized Ŵ (fp32) in shared memory, TILE×TILE outputs
  per block.
* fp16 branch (FORMAT.md, optional): y += x[:, idx] @ Bᵀ by a second small kernel, one thread
  per output, B (out, k) held as fp32 (exact from fp16).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np

from decoupleq_ref.matmul import PackedLayer

from ._cuda import available, blocks, cuda, jit, require, simulator
from .linalg import TILE

GEMV_MAX_BATCH = 16
WARP = 32
GEMV_WARPS = 8
CHUNK_WORDS = WARP  # words per row per step: one per lane
MM_K = 32  # columns per GEMM step
MM_K_PAD = MM_K + 1  # CUDA needs literal shared-array shapes (see linalg.TILE_PAD)
MAX_STATIC_SHARED = 48 * 1024  # bytes of static shared memory a block may declare
SUPPORTED_BITS = (1, 2, 4, 8)


def gemv_rows_per_warp(batch: int) -> int:
    """Rows a warp carries through one pass over x: more rows share each staged x value and put
    more loads in flight per lane, bounded by rows × batch ≤ 32 accumulators (one lane writes
    each result). Measured on an H200 (BENCHMARKS.md §4): 4 rows at batch 1 (8 rows: 1.25×
    slower on 16384²), 8 rows at batch 4 (1.45× faster than 4 on 16384²)."""
    return 4 if batch == 1 else min(8, WARP // batch)


def gemv_shared_bytes(bits: int, batch: int, warps: int = GEMV_WARPS, rows: int = 0) -> int:
    """Static shared memory of ``gemv_kernel``: one buffer holding the staged x chunk during the
    loop and the lanes' partial sums after it."""
    rows = rows or gemv_rows_per_warp(batch)
    return 4 * max(batch * CHUNK_WORDS * (32 // bits + 1), warps * rows * batch * WARP)


def gemv_fits(bits: int, batch: int, warps: int = GEMV_WARPS, rows: int = 0) -> bool:
    """The GEMV kernel exists for this shape: ≤ 32 results per warp and ≤ 48 KiB of static shared memory."""
    rows = rows or gemv_rows_per_warp(batch)
    return rows * batch <= WARP and gemv_shared_bytes(bits, batch, warps, rows) <= MAX_STATIC_SHARED


@jit(device=True, inline=True)
def warp_sums_to_y(sm, acc, nacc, batch, warp, lane, o0, out, y):
    """y[b, o0 + k] = Σ over the warp's lanes of acc[k·batch + b], k·batch + b < nacc ≤ 32: a
    fixed-order tree over the lanes (deterministic, all sums at once) in the warp's slice of sm
    (nacc·32 floats from warp·nacc·32); lane l writes result l. Every thread of the block calls
    it (it synchronises)."""
    red = (warp * nacc) * WARP
    for e in range(nacc):
        sm[red + e * WARP + lane] = acc[e]
    cuda.syncthreads()
    step = WARP // 2
    while step > 0:
        if lane < step:
            for e in range(nacc):
                sm[red + e * WARP + lane] += sm[red + e * WARP + lane + step]
        cuda.syncthreads()
        step //= 2
    if lane < nacc:
        o = o0 + lane // batch
        if o < out:
            y[lane % batch, o] = sm[red + lane * WARP]


@functools.lru_cache(maxsize=None)
def gemv_kernel(bits: int, batch: int, warps: int = GEMV_WARPS, rows: int = 0):
    """The GEMV kernel for one (bits, batch, warps per block, rows per warp):
    y[b, o] = Σ_col x[b, col]·Ŵ[o, col].

    Specialised by closure constants, so every loop over codes, batch rows and a warp's rows has
    a trip count known to the compiler (unrolled, accumulators in registers, no local memory)
    and the shared array has a literal shape. Block = ``warps`` warps, each warp ``rows``
    consecutive output rows; per step a lane loads one 32-bit word of each of its rows (a warp
    reads 128 contiguous bytes per row, the rows' loads in flight together), and the block
    stages the matching chunk of x in shared memory once for all its rows (padded stride
    cpw + 1: no bank conflicts). Groups spanning whole words add s·Σ x·q + z·Σ x per word, Σ x
    shared by the warp's rows. Lane partial sums meet in a fixed-order tree (deterministic)."""
    rows = rows or gemv_rows_per_warp(batch)
    cpw = 32 // bits
    mask = (1 << bits) - 1
    stride = cpw + 1
    xs_width = CHUNK_WORDS * stride
    nacc = rows * batch
    rows_per_block = warps * rows
    threads = warps * WARP
    shared_floats = gemv_shared_bytes(bits, batch, warps, rows) // 4
    if not gemv_fits(bits, batch, warps, rows):
        raise ValueError(f"gemv_kernel: rows·batch = {nacc} (at most {WARP}) and {4 * shared_floats} bytes of "
                         f"shared memory (at most {MAX_STATIC_SHARED}) for bits={bits}, batch={batch}, "
                         f"warps={warps}; use fewer warps or rows, or the GEMM path")

    @jit
    def kernel(x, words, scale, zero, gs, y):
        sm = cuda.shared.array(shared_floats, np.float32)
        acc = cuda.local.array(nacc, np.float32)
        dq = cuda.local.array(nacc, np.float32)
        sx = cuda.local.array(batch, np.float32)
        wd = cuda.local.array(rows, np.uint32)
        tid = cuda.threadIdx.x
        warp, lane = tid // WARP, tid % WARP
        o0 = cuda.blockIdx.x * rows_per_block + warp * rows
        n = x.shape[1]
        out, nwords = words.shape
        whole_words = gs % cpw == 0
        for e in range(nacc):
            acc[e] = 0.0
        for w0 in range(0, nwords, CHUNK_WORDS):
            c0 = w0 * cpw
            for e in range(tid, batch * CHUNK_WORDS * cpw, threads):
                bb, c = e // (CHUNK_WORDS * cpw), e % (CHUNK_WORDS * cpw)
                col = c0 + c
                sm[bb * xs_width + (c // cpw) * stride + c % cpw] = np.float32(x[bb, col]) if col < n else np.float32(0.0)
            cuda.syncthreads()
            m = w0 + lane
            if m < nwords and m * cpw < n:
                for k in range(rows):
                    wd[k] = words[o0 + k, m] if o0 + k < out else np.uint32(0)
                base = lane * stride
                if whole_words:
                    for e in range(nacc):
                        dq[e] = 0.0
                    for bb in range(batch):
                        sx[bb] = 0.0
                    for r in range(cpw):
                        for bb in range(batch):
                            v = sm[bb * xs_width + base + r]
                            sx[bb] += v
                            for k in range(rows):
                                dq[k * batch + bb] += v * np.float32((wd[k] >> (r * bits)) & mask)
                    g = (m * cpw) // gs
                    for k in range(rows):
                        if o0 + k < out:
                            s, z = scale[o0 + k, g], zero[o0 + k, g]
                            for bb in range(batch):
                                acc[k * batch + bb] += s * dq[k * batch + bb] + z * sx[bb]
                else:
                    for r in range(cpw):
                        col = m * cpw + r
                        if col < n:
                            g = col // gs
                            for k in range(rows):
                                if o0 + k < out:
                                    wv = scale[o0 + k, g] * np.float32((wd[k] >> (r * bits)) & mask) + zero[o0 + k, g]
                                    for bb in range(batch):
                                        acc[k * batch + bb] += sm[bb * xs_width + base + r] * wv
            cuda.syncthreads()
        # after the loop's last barrier the x chunk is dead: reuse it for the lanes' sums
        warp_sums_to_y(sm, acc, nacc, batch, warp, lane, o0, out, y)

    kernel.factory = ("gemv_kernel", (bits, batch, warps, rows))  # read by gpu.compile_check
    return kernel


def launch_gemv(dx, dev: "DevicePackedLayer", y, warps: int = GEMV_WARPS, rows: int = 0) -> None:
    """y = dx @ Ŵᵀ by ``gemv_kernel`` (the packed part only; ``packed_matmul`` adds the branch)."""
    batch, out = dx.shape[0], dev.shape[0]
    rows = rows or gemv_rows_per_warp(batch)
    kernel = gemv_kernel(dev.bits, batch, warps, rows)
    kernel[blocks(out, warps * rows), warps * WARP](dx, dev.words, dev.scale, dev.zero, dev.group_size, y)


# --- W2 quad GEMV: 16-byte loads, no barrier in the loop, inner step in linked CUDA C ----------
# One lane per quad of 4 packed words (64 codes, 16 bytes) of each of its warp's rows; x is read
# straight from global memory (fp16, read-only cache: every warp reads the same x) instead of
# being staged in shared memory, so the loop has no block barrier; one barrier tree at the end.
# The load/convert/FMA step is ``_w2_quad_step`` (Python, what the simulator runs) or its twin
# ``w2_quad_step`` in gpu/packed_quad.cu (linked on a real GPU, see ``quad_linked``). Without
# link-time optimisation the C step is a real call, so the lane's accumulators pass through local
# memory once per quad (7 .local references in the PTX; the word GEMV has none): the first thing
# to look at if the hardware figures disappoint.
QUAD_SOURCE = Path(__file__).with_name("packed_quad.cu")
QUAD_WORDS = 4  # words per 16-byte load
QUAD_CODES = QUAD_WORDS * 16  # columns per load at 2 bits
QUAD_MAX_ROWS = 8  # W2_QUAD_MAX_ROWS in packed_quad.cu
QUAD_MAX_BATCH = 4  # batch rows of the quad path (fits the 32 accumulators per warp at 8 rows)
QUAD_SIGNATURE = ("int32(CPointer(uint32), int64, int64, int32, int64, CPointer(float16), int64, int32, "
                  "CPointer(float32), CPointer(float32), int64, int64, CPointer(float32))")


def quad_fits(bits: int, group_size: int, n_in: int, x_dtype, batch: int) -> bool:
    """The quad GEMV serves this call: W2, fp16 activations, batch ≤ QUAD_MAX_BATCH and groups
    of whole 64-column quads (g % 64 == 0, per-channel included when in % 64 == 0)."""
    return (bits == 2 and np.dtype(x_dtype) == np.float16 and 1 <= batch <= QUAD_MAX_BATCH
            and group_size % QUAD_CODES == 0 and n_in % QUAD_CODES == 0)


@jit(device=True)
def _w2_quad_step(words, o0, rows, word, x, batch, scale, zero, g, acc):
    """acc[k·batch + b] += s·Σ x·q + z·Σ x over the 64 columns of quad ``word`` (4 words from
    ``word``) of rows o0 … o0 + rows − 1, with (s, z) of group g: the pure-Numba twin of
    ``w2_quad_step`` in packed_quad.cu (same sums, same column order; the C one uses 16-byte
    loads and fused multiply-adds)."""
    col0 = word * 16
    for b in range(batch):
        sx = np.float32(0.0)
        for c in range(QUAD_CODES):
            sx += np.float32(x[b, col0 + c])
        for k in range(rows):
            dq = np.float32(0.0)
            for c in range(QUAD_CODES):
                code = (words[o0 + k, word + c // 16] >> np.uint32(2 * (c % 16))) & np.uint32(3)
                dq += np.float32(x[b, col0 + c]) * np.float32(code)
            acc[k * batch + b] += scale[o0 + k, g] * dq + zero[o0 + k, g] * sx


def _linked_quad_step():
    """``w2_quad_step`` from packed_quad.cu wrapped with ``_w2_quad_step``'s arguments, or None
    where it cannot be linked (the simulator runs Python only; cffi passes the array pointers)."""
    if cuda is None or simulator():
        return None
    try:
        import cffi
    except ImportError:
        return None
    ffi = cffi.FFI()
    step_c = cuda.declare_device("w2_quad_step", QUAD_SIGNATURE, link=str(QUAD_SOURCE))

    @jit(device=True)
    def step(words, o0, rows, word, x, batch, scale, zero, g, acc):
        step_c(ffi.from_buffer(words), words.shape[1], o0, rows, word, ffi.from_buffer(x), x.shape[1], batch,
               ffi.from_buffer(scale), ffi.from_buffer(zero), scale.shape[1], g, ffi.from_buffer(acc))

    return step


@functools.lru_cache(maxsize=1)
def linked_quad_step():
    """The linked inner step, built once (None where unavailable: see ``_linked_quad_step``)."""
    return _linked_quad_step()


_LINK_FAILURES: list[str] = []  # why the linked step failed to build here, if it did (then never retried)


def quad_linked() -> bool:
    """The quad GEMV runs the linked CUDA C step: a real GPU and cffi (never the simulator), and
    the step has not failed to build in this process."""
    return available() and not _LINK_FAILURES and linked_quad_step() is not None


@functools.lru_cache(maxsize=None)
def gemv_quad_kernel(batch: int, warps: int = GEMV_WARPS, rows: int = 0, linked: bool = False):
    """The W2 quad GEMV for one (batch, warps, rows per warp), with the inner step in linked
    CUDA C (``linked``) or in Python (``_w2_quad_step``). y[b, o] = Σ_col x[b, col]·Ŵ[o, col].

    Block = ``warps`` warps of ``rows`` consecutive output rows; lane l takes quads l, l + 32, …
    (a warp reads 512 contiguous bytes per row per pass). Lane partial sums meet in
    ``warp_sums_to_y``'s fixed-order tree, as in ``gemv_kernel`` (deterministic)."""
    rows = rows or gemv_rows_per_warp(batch)
    nacc = rows * batch
    rows_per_block = warps * rows
    shared_floats = warps * nacc * WARP
    if rows > QUAD_MAX_ROWS or nacc > WARP or 4 * shared_floats > MAX_STATIC_SHARED or batch > QUAD_MAX_BATCH:
        raise ValueError(f"gemv_quad_kernel: rows={rows} (at most {QUAD_MAX_ROWS}), rows·batch={nacc} (at most "
                         f"{WARP}), batch={batch} (at most {QUAD_MAX_BATCH}), {4 * shared_floats} bytes of shared "
                         f"memory (at most {MAX_STATIC_SHARED}); use fewer warps or rows")
    step = linked_quad_step() if linked else _w2_quad_step
    if step is None:
        raise ValueError("gemv_quad_kernel: linked=True needs a real GPU and cffi (pip install cffi); "
                         "use linked=False")

    @jit
    def kernel(x, words, scale, zero, gs, y):
        sm = cuda.shared.array(shared_floats, np.float32)
        acc = cuda.local.array(nacc, np.float32)
        tid = cuda.threadIdx.x
        warp, lane = tid // WARP, tid % WARP
        o0 = cuda.blockIdx.x * rows_per_block + warp * rows
        out, nwords = words.shape
        nrows = min(rows, out - o0)
        for e in range(nacc):
            acc[e] = 0.0
        if nrows > 0:
            for word in range(lane * QUAD_WORDS, nwords, WARP * QUAD_WORDS):
                step(words, o0, nrows, word, x, batch, scale, zero, (word * 16) // gs, acc)
        warp_sums_to_y(sm, acc, nacc, batch, warp, lane, o0, out, y)

    kernel.factory = ("gemv_quad_kernel", (batch, warps, rows, linked))  # read by gpu.compile_check
    return kernel


def launch_gemv_quad(dx, dev: "DevicePackedLayer", y, warps: int = GEMV_WARPS, rows: int = 0,
                     linked: bool | None = None) -> None:
    """y = dx @ Ŵᵀ by ``gemv_quad_kernel`` (packed part only); linked=None: ``quad_linked()``."""
    batch, out = dx.shape[0], dev.shape[0]
    rows = rows or gemv_rows_per_warp(batch)
    use_c = quad_linked() if linked is None else linked
    try:
        gemv_quad_kernel(batch, warps, rows, use_c)[blocks(out, warps * rows), warps * WARP](
            dx, dev.words, dev.scale, dev.zero, dev.group_size, y)
    except Exception as exc:  # NVRTC or the linker missing on this machine: say so once, run Python
        if linked is not None or not use_c:
            raise
        _LINK_FAILURES.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"packed_matmul: the linked CUDA C step (gpu/packed_quad.cu) failed to build "
                      f"({_LINK_FAILURES[0][:300]}); the quad GEMV uses its Python step", RuntimeWarning, stacklevel=2)
        launch_gemv_quad(dx, dev, y, warps, rows, linked=False)


@jit
def _gemm_kernel(x, words, scale, zero, bits, gs, y):
    """Block = TILE batch rows × TILE outputs; per step MM_K columns of x and of Ŵ in shared memory."""
    xs = cuda.shared.array((TILE, MM_K_PAD), np.float32)
    ws = cuda.shared.array((TILE, MM_K_PAD), np.float32)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    tid = ty * TILE + tx
    b0, o0 = cuda.blockIdx.y * TILE, cuda.blockIdx.x * TILE
    batch, n = x.shape
    out = words.shape[0]
    cpw = 32 // bits
    mask = (1 << bits) - 1
    acc = np.float32(0.0)
    for k0 in range(0, n, MM_K):
        for e in range(tid, TILE * MM_K, TILE * TILE):
            r, c = e // MM_K, e % MM_K
            col = k0 + c
            xs[r, c] = np.float32(x[b0 + r, col]) if b0 + r < batch and col < n else np.float32(0.0)
            o = o0 + r
            if o < out and col < n:
                g = col // gs
                code = (words[o, col // cpw] >> ((col % cpw) * bits)) & mask
                ws[r, c] = scale[o, g] * np.float32(code) + zero[o, g]
            else:
                ws[r, c] = 0.0
        cuda.syncthreads()
        for t in range(MM_K):
            acc += xs[ty, t] * ws[tx, t]
        cuda.syncthreads()
    if b0 + ty < batch and o0 + tx < out:
        y[b0 + ty, o0 + tx] = acc


@jit
def _branch_kernel(x, idx, B, y):
    """y[b, o] += Σ_j x[b, idx[j]]·B[o, j]: the fp16 branch's k columns (fp32 accumulation)."""
    o, b = cuda.grid(2)
    if b < y.shape[0] and o < y.shape[1]:
        acc = np.float32(0.0)
        for j in range(idx.shape[0]):
            acc += np.float32(x[b, idx[j]]) * B[o, j]
        y[b, o] += acc


class DevicePackedLayer:
    """A PackedLayer on the device: uint32 words (out, row_bytes/4), fp32 scale and zero, and
    the fp16 branch (int32 indices, B as fp32) when the layer has one."""

    def __init__(self, layer: PackedLayer):
        if not isinstance(layer, PackedLayer):
            raise ValueError(f"layer: expected a decoupleq_ref.PackedLayer, got {type(layer).__name__}; "
                             f"build one with PackedLayer.from_result(res)")
        if layer.bits not in SUPPORTED_BITS:
            raise ValueError(f"layer.bits: packed_matmul supports bits in {SUPPORTED_BITS} (codes that never "
                             f"straddle a 32-bit word); got {layer.bits}: use decoupleq_ref.matmul")
        require()
        self.shape, self.bits = layer.shape, layer.bits
        self.group_size = layer.shape[1] if layer.group_size == -1 else layer.group_size
        self.words = cuda.to_device(np.ascontiguousarray(layer.packed).view("<u4"))
        self.scale = cuda.to_device(np.ascontiguousarray(layer.scale, np.float32))
        self.zero = cuda.to_device(np.ascontiguousarray(layer.zero, np.float32))
        self.hp_index = self.hp_weight = None
        if layer.hp_channels:
            self.hp_index = cuda.to_device(np.ascontiguousarray(layer.hp_index, np.int32))
            self.hp_weight = cuda.to_device(np.ascontiguousarray(layer.hp_weight, np.float32))


def _check_x(x, n_in: int):
    dtype, shape = np.dtype(x.dtype), tuple(x.shape)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"x: expected float16 or float32 activations, got {dtype}; convert with x.astype(np.float16)")
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"x: expected a non-empty 2-D (batch, in) array, got shape {shape}")
    if shape[1] != n_in:
        raise ValueError(f"x: has {shape[1]} columns but the layer's input dimension is {n_in}")


def packed_matmul(x, layer: PackedLayer | DevicePackedLayer, out=None):
    """y = x @ Ŵᵀ (fp32) for x (batch, in) fp16/fp32, a numpy or numba device array; with the
    fp16 branch, y = x @ (s·q + z)ᵀ + x[:, idx] @ Bᵀ.

    A host x gives a host y; a device x gives a device y (what benchmarks time). ``out``: a
    device float32 (batch, out) array to write y into (no allocation per call; device x only).
    GEMV kernel for batch ≤ GEMV_MAX_BATCH where it fits (``gemv_fits``), tiled GEMM otherwise."""
    dev = layer if isinstance(layer, DevicePackedLayer) else DevicePackedLayer(layer)
    _check_x(x, dev.shape[1])
    on_host = isinstance(x, np.ndarray)
    dx = cuda.to_device(np.ascontiguousarray(x)) if on_host else x
    batch, n_out = dx.shape[0], dev.shape[0]
    if out is None:
        y = cuda.device_array((batch, n_out), np.float32)
    elif on_host or np.dtype(out.dtype) != np.float32 or tuple(out.shape) != (batch, n_out):
        raise ValueError(f"out: expected a float32 device array of shape {(batch, n_out)} with a device x, "
                         f"got {np.dtype(out.dtype)} {tuple(out.shape)}{' and a host x' if on_host else ''}; "
                         f"leave out=None to get a new array")
    else:
        y = out
    if quad_fits(dev.bits, dev.group_size, dev.shape[1], dx.dtype, batch) and dx.is_c_contiguous():
        launch_gemv_quad(dx, dev, y)
    elif batch <= GEMV_MAX_BATCH and gemv_fits(dev.bits, batch):
        launch_gemv(dx, dev, y)
    else:
        _gemm_kernel[(blocks(n_out, TILE), blocks(batch, TILE)), (TILE, TILE)](dx, dev.words, dev.scale, dev.zero,
                                                                             dev.bits, dev.group_size, y)
    if dev.hp_index is not None:
        _branch_kernel[(blocks(n_out, TILE), blocks(batch, TILE)), (TILE, TILE)](dx, dev.hp_index, dev.hp_weight, y)
    return y.copy_to_host() if on_host else y


#: the activation dtypes the kernel takes (validate.check_kernel skips the others)
packed_matmul.supported_dtypes = ("float32", "float16")
