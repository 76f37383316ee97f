"""Atlas's native CPU kernels (decode attention, small-batch matmuls), compiled on first use.

What it does: compiles `cpu_kernels.c` with the system C compiler (`$CC`, else `cc`)
for this machine's CPU (`-O3 -march=native -fopenmp`), caches the shared library under
`$ATLAS_HOME/kernels` (default `~/.cache/atlas/kernels`; a name derived from the source,
the flags, the compiler and the CPU, written atomically so concurrent first uses agree),
and calls it through `ctypes` on tensors' raw pointers. `decode_attention()` and
`matmul_panels()` check every shape, dtype, device and index before they hand a pointer
to C; `pack_panels()` lays a weight out the way `matmul_panels()` reads it, and
`PanelWeight` is that copy of a model's weight, which steps aside once the weight changes
(weight_copy.py): the fp32 serving path for every product, whatever its number of rows,
so a row's numbers never depend on what else is in the batch.

Why C and not PyTorch: see cpu_kernels.c. Compiling takes well under a second and
needs no PyTorch headers, so no build step comes with it.

Images without a compiler ship a library built ahead of time for a portable target
(`python -c "from atlas_server.model.native import main; main()" --march x86-64-v3 FILE`,
as the Dockerfile does) and point `ATLAS_NATIVE_LIB` at it; nothing is compiled at run time.
Every library carries the hash of the source it was built from, and one built from another
version is refused with a warning, since its functions may take other arguments.

`quantize_q8()` turns a weight into 8-bit panels with a scale per block of 32 weights
(llama.cpp's q8_0, the same numbers as its quantizer gives), `matmul_panels_q8()` multiplies
by them in fp32 and `Int8PanelWeight` is that copy of a model's weight (`atlas serve --set
model.quantize=int8`).

`rms_norm()` and `rope_in_place()` are a Llama block's norm and rotary embedding at one
call each, where PyTorch takes 6-10 small operations.
What it does not do: arithmetic in anything but fp32 on the CPU (the int8 weights are
widened to fp32 as they are read), or autograd. Where no compiler is found
or compiling fails, `available()` is False (one warning says why) and callers keep their
PyTorch path; `ATLAS_NATIVE=0` turns the kernel off to compare.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from .weight_copy import WeightCopy

__all__ = [
    "Int8PanelWeight",
    "PanelWeight",
    "available",
    "decode_attention",
    "matmul_panels",
    "dequantize_q8",
    "matmul_panels_q8",
    "pack_panels",
    "quantize_q8",
    "rms_norm",
    "rope_in_place",
]

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]
_MAX_HEAD_DIM = 256  # the kernel's stack buffers
Q8_BLOCK = 32  # cpu_kernels.c's QK: weights along k that share one int8 scale (as q8_0)


def _cache_dir() -> Path:
    home = Path(os.environ.get("ATLAS_HOME", Path.home() / ".cache" / "atlas"))
    return home / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _source_sha() -> str:
    """What a library must have been built from to be called: its signatures are this file's."""
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]


def _compile(compiler: str, target: Path | None = None, march: str = "native") -> Path:
    """Build the library (into the cache unless `target` is given); returns its path."""
    flags = [*_FLAGS, f"-march={march}", f'-DSOURCE_SHA="{_source_sha()}"']
    if target is None:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True
        ).stdout
        key = hashlib.sha256(
            "\0".join([_SOURCE.read_text(), *flags, version, _cpu_signature()]).encode()
        ).hexdigest()[:16]
        target = _cache_dir() / f"cpu_kernels-{key}.so"
        if target.exists():
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: a reader never sees a half-written library.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", partial, "-lm"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("ATLAS_NATIVE", "1") == "0":
        return None
    prebuilt, compiler = os.environ.get("ATLAS_NATIVE_LIB"), _compiler()
    if not prebuilt and compiler is None:
        log.warning("no C compiler found: decoding uses PyTorch's kernels (slower)")
        return None
    try:
        torch.zeros(1).add_(1)  # load torch's OpenMP runtime first, so the kernel shares it
        library = ctypes.CDLL(prebuilt or str(_compile(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("native CPU kernels unavailable, using PyTorch's: %s", detail.strip())
        return None
    # A prebuilt library from another version of cpu_kernels.c may have other signatures:
    # calling it would read arguments wrongly, so it must say which source it was built from.
    built_from = getattr(library, "source_sha", None)
    if built_from is not None:
        built_from.restype = ctypes.c_char_p
    if built_from is None or built_from().decode() != _source_sha():
        log.warning(
            "native CPU kernels unavailable, using PyTorch's: %s was built from another version"
            " of cpu_kernels.c; rebuild it (python -c 'from atlas_server.model.native import"
            " main; main()' FILE)",
            prebuilt,
        )
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.decode_attention.argtypes = (
        [pointer, i64, pointer, pointer, i64] + [pointer] * 5 + [i64] * 9
    ) + [ctypes.c_float, ctypes.c_int]
    library.decode_attention.restype = i64
    library.matmul_panels.argtypes = [pointer] * 4 + [i64] * 3 + [ctypes.c_int] * 2
    library.rms_norm.argtypes = [pointer] * 3 + [i64] * 2 + [ctypes.c_float, ctypes.c_int]
    library.rope_rows.argtypes = [pointer] + [i64] * 5 + [pointer] * 3 + [i64, ctypes.c_int]
    library.rope_rows.restype = i64
    library.matmul_panels.restype = None
    library.matmul_panels_q8.argtypes = [pointer] * 5 + [i64] * 3 + [ctypes.c_int] * 2
    library.matmul_panels_q8.restype = None
    library.rms_norm.restype = None
    library.decode_stack.argtypes = [pointer, i64] + [pointer] * 7 + [ctypes.c_int]
    library.decode_stack.restype = i64
    library.decode_stack_scratch.argtypes = [pointer]
    library.decode_stack_scratch.restype = i64
    library.width = library.panel_width()  # floats per panel, fixed when it was compiled
    return library


def _named(name: str):
    """A range named `name` in profiles (bench/profile_step.py reads them), opened only while
    a profiler runs: record_function costs ~6 us a call, 1-3% of a decode step."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def available() -> bool:
    """True when the kernels are compiled and loaded (compiles them on first call)."""
    return _library() is not None


def decode_attention(
    q: Tensor,  # [B, H, D]: one query token per row
    k_store: Tensor,  # [n_slots, K, max_len, D]: a layer's whole key cache
    v_store: Tensor,  # same shape and strides as k_store
    slots: Tensor,  # [B] int64: the cache slot of each row
    lengths: Tensor,  # [B] int64: row b attends to positions [0, lengths[b])
    scale: float,
    new_k: Tensor | None = None,  # [B, K, D]: this step's keys, stored before attending
    new_v: Tensor | None = None,  # [B, K, D]: this step's values
) -> Tensor:
    """softmax(q K^T * scale) V per row over its own cached positions: [B, H, D]. With
    `new_k` and `new_v`, row b's key and value are first stored at position lengths[b] - 1
    of its slot (a decode step's cache write, in the same call)."""
    library = _library()
    if library is None:
        raise RuntimeError("native CPU kernels are not available (see available())")
    B, H, D = q.shape
    n_slots, K, max_len, _ = k_store.shape
    new = () if new_k is None and new_v is None else (new_k, new_v)
    # Checked with the cheapest attributes: at one token the call runs once per layer.
    if any(
        t is None or not t.is_cpu or t.dtype != torch.float32 for t in (q, k_store, v_store, *new)
    ):
        raise ValueError("decode_attention needs float32 CPU tensors (new_k and new_v together)")
    if k_store.shape != v_store.shape or k_store.stride() != v_store.stride():
        raise ValueError("key and value caches must share shape and strides")
    if k_store.shape[3] != D or k_store.stride(3) != 1 or H % K or D > _MAX_HEAD_DIM:
        raise ValueError(f"unsupported shapes: q {tuple(q.shape)}, cache {tuple(k_store.shape)}")
    if new and (new_k.shape != (B, K, D) or new_v.shape != (B, K, D)):
        raise ValueError(f"new keys and values must both be [{B}, {K}, {D}]")
    if q.stride(2) != 1 or q.stride(1) != D:  # rows may be any distance apart, heads not
        q = q.contiguous()
    if new and (new_k.stride() != new_v.stride() or new_k.stride(2) != 1 or new_k.stride(1) != D):
        # One layout for both (the kernel takes one row stride): views of the fused qkv
        # share theirs; a key turned by PyTorch's RoPE is a tensor of its own.
        new_k, new_v = new_k.contiguous(), new_v.contiguous()
    if slots.shape != (B,) or lengths.shape != (B,):
        raise ValueError("slots and lengths need one entry per row")
    slots, lengths = slots.to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous()
    out = q.new_empty((B, H, D))
    with _named("atlas::decode_attention"):
        bad = library.decode_attention(
            q.data_ptr(),
            q.stride(0),
            new_k.data_ptr() if new else None,
            new_v.data_ptr() if new else None,
            new_k.stride(0) if new else 0,
            k_store.data_ptr(),
            v_store.data_ptr(),
            out.data_ptr(),
            slots.data_ptr(),
            lengths.data_ptr(),
            n_slots,
            max_len,
            B,
            H,
            K,
            D,
            *k_store.stride()[:3],
            scale,
            torch.get_num_threads(),
        )
    if bad >= 0:
        raise IndexError(
            f"row {bad}: slot {int(slots[bad])} or length {int(lengths[bad])} outside the KV"
            f" cache ({n_slots} slots of {max_len} positions)"
        )
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight, for x [..., C] and weight [C]: [..., C]."""
    library = _library()
    if library is None:
        raise RuntimeError("native CPU kernels are not available (see available())")
    # Checked with the cheapest attributes: at one token the call runs twice per layer.
    if not (x.is_cpu and weight.is_cpu and x.dtype == weight.dtype == torch.float32):
        raise ValueError("rms_norm needs float32 CPU tensors")
    dim = x.shape[-1]
    if weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"unsupported shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty_like(x)  # [..., C], contiguous like x
    library.rms_norm(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // max(dim, 1), dim, eps,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def rope_in_place(
    qkv: Tensor,  # [B, T, W]: each row's heads side by side, the ones to turn first
    positions: Tensor,  # [B, T] int64
    cos: Tensor,  # [L, R]: cos of each position's angles, halves repeated (rope_tables)
    sin: Tensor,  # [L, R]
    heads: int,  # how many heads of D dims, from the start of each row, turn
    head_dim: int,
) -> None:
    """Rotary embedding applied in place to the first `heads` heads of every row, the first
    R dims of each ("rotate half" within them; the rest pass): a Llama layer's q and k heads,
    straight in the projection's output. Same function as transformer.apply_rope."""
    library = _library()
    if library is None:
        raise RuntimeError("native CPU kernels are not available (see available())")
    if not all(t.is_cpu and t.dtype == torch.float32 for t in (qkv, cos, sin)):
        raise ValueError("rope_in_place needs float32 CPU tensors")
    B, T, width = qkv.shape
    table_len, rotated = cos.shape
    if (
        not qkv.is_contiguous()
        or positions.shape != (B, T)
        or positions.dtype != torch.int64
        or sin.shape != cos.shape
        or not (cos.is_contiguous() and sin.is_contiguous())
        or rotated % 2
        or not 0 < rotated <= head_dim
        or heads * head_dim > width
    ):
        raise ValueError(
            f"unsupported shapes: qkv {tuple(qkv.shape)}, positions {tuple(positions.shape)} "
            f"{positions.dtype}, tables {tuple(cos.shape)}, heads {heads} x {head_dim}"
        )
    positions = positions.contiguous()
    bad = library.rope_rows(
        qkv.data_ptr(), B * T, width, heads, head_dim, rotated, positions.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), table_len, torch.get_num_threads(),
    )  # fmt: skip
    if bad >= 0:
        raise IndexError(f"position {int(positions.view(-1)[bad])} outside the RoPE tables")


def pack_panels(weight: Tensor) -> Tensor:
    """weight [K, N] as the column panels matmul_panels reads: [P, K, NR], P = ceil(N / NR),
    panel p holding columns p*NR..(p+1)*NR-1 (zeros past N). A copy: the weight's memory."""
    library = _library()
    if library is None:
        raise RuntimeError("native CPU kernels are not available (see available())")
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError("pack_panels needs a 2-D float32 CPU tensor")
    width = library.width
    k, n = weight.shape
    n_panels = -(-n // width)
    padded = weight.new_zeros(k, n_panels * width)  # [K, P * NR]
    padded[:, :n] = weight.detach()
    return padded.view(k, n_panels, width).transpose(0, 1).contiguous()  # [P, K, NR]


def matmul_panels(
    x: Tensor, panels: Tensor, n_out: int, bias: Tensor | None = None, gelu_tanh: bool = False
) -> Tensor:
    """x [..., K] @ W (+ bias [N]) with W given as `pack_panels(W)`, then GELU (tanh form)
    when asked, applied while the tile is still in cache: [..., n_out]."""
    library = _library()
    if library is None:
        raise RuntimeError("native CPU kernels are not available (see available())")
    tensors = (x, panels) if bias is None else (x, panels, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("matmul_panels needs float32 CPU tensors")
    width = library.width
    if (
        panels.dim() != 3
        or not panels.is_contiguous()
        or panels.shape[2] != width
        or panels.shape[1] != x.shape[-1]
        or not (panels.shape[0] - 1) * width < n_out <= panels.shape[0] * width
        or (bias is not None and (bias.shape != (n_out,) or not bias.is_contiguous()))
    ):
        raise ValueError(
            f"unsupported shapes: x {tuple(x.shape)}, panels {tuple(panels.shape)}, "
            f"n_out {n_out}, bias {None if bias is None else tuple(bias.shape)}"
        )
    return _multiply(library, x, panels, n_out, bias, gelu_tanh)


def _multiply(
    library: ctypes.CDLL,
    x: Tensor,
    panels: Tensor,
    n_out: int,
    bias: Tensor | None,
    gelu_tanh: bool,
    scales: Tensor | None = None,
) -> Tensor:
    """matmul_panels (or, with `scales`, matmul_panels_q8 over int8 `panels`) once its
    arguments are known to be right: [..., n_out]."""
    x = x if x.is_contiguous() else x.contiguous()  # [..., K], rows back to back
    y = x.new_empty(x.shape[:-1] + (n_out,))
    bias_ptr = None if bias is None else bias.data_ptr()
    rows, threads = x.shape[:-1].numel(), torch.get_num_threads()  # M rows
    if scales is None:
        with _named("atlas::matmul_panels"):
            library.matmul_panels(
                x.data_ptr(), panels.data_ptr(), bias_ptr, y.data_ptr(), rows,
                panels.shape[1], n_out, int(gelu_tanh), threads,
            )  # fmt: skip
    else:
        with _named("atlas::matmul_panels_q8"):
            library.matmul_panels_q8(
                x.data_ptr(), panels.data_ptr(), scales.data_ptr(), bias_ptr, y.data_ptr(),
                rows, panels.shape[1], n_out, int(gelu_tanh), threads,
            )  # fmt: skip
    return y


def quantize_q8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [K, N] fp32 as the 8-bit panels matmul_panels_q8 reads: (q [P, K, NR] int8,
    scales [P, G, NR] fp16), G = ceil(K / 32). Each column's weights are cut along k into
    blocks of 32, each stored as q = round(w / d) with d = max|w| / 127 in fp16: ggml's
    q8_0 rounding exactly (tests compare with the `gguf` package's), so a
    checkpoint served in int8 computes with the weights `export-gguf --type q8_0` writes.
    Columns past N are zero."""
    library = _library()
    if library is None:
        raise RuntimeError("native CPU kernels are not available (see available())")
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError("quantize_q8 needs a 2-D float32 CPU tensor")
    w = weight.detach()
    k, n = w.shape
    width, n_blocks = library.width, -(-k // Q8_BLOCK)
    n_panels = -(-n // width)
    blocks = w.new_zeros(n_blocks * Q8_BLOCK, n_panels * width)  # [G * 32, P * NR]
    blocks[:k, :n] = w
    blocks = blocks.view(n_blocks, Q8_BLOCK, n_panels * width)  # [G, 32, P * NR]
    d = blocks.abs().amax(dim=1) / 127  # [G, P * NR], fp32 as ggml computes it
    inverse = torch.where(d == 0, 0.0, 1.0 / d)
    scaled = blocks * inverse[:, None, :]
    # Halves away from zero, as C's roundf in ggml, not torch.round's halves to even; and
    # as the gguf package computes it (floor(a) + floor(2 (a - floor(a)))), because
    # floor(a + 0.5) rounds a = 0.49999997 up: a + 0.5 is 1.0 in fp32.
    magnitude = scaled.abs()
    whole = magnitude.floor()
    q = (scaled.sign() * (whole + (2 * (magnitude - whole)).floor())).to(torch.int8)
    q = q.view(n_blocks * Q8_BLOCK, n_panels, width)[:k].transpose(0, 1).contiguous()
    d = d.half()  # stored as fp16, as in q8_0: the scale it computes with
    scales = d.view(n_blocks, n_panels, width).transpose(0, 1).contiguous()  # [P, G, NR]
    return q, scales


def dequantize_q8(q: Tensor, scales: Tensor, k: int, n: int) -> Tensor:
    """The [K, N] fp32 weight that `quantize_q8`'s panels stand for (what the int8 products
    compute with): for checks against other implementations run on plain fp32 weights."""
    panels, width = q.shape[0], q.shape[2]
    values = q.float().transpose(0, 1).reshape(k, panels * width)[:, :n]  # [K, N]
    blocks = scales.float().transpose(0, 1).reshape(scales.shape[1], panels * width)[:, :n]
    return values * blocks.repeat_interleave(Q8_BLOCK, 0)[:k]  # [G, N] -> [K, N]


def matmul_panels_q8(
    x: Tensor,
    q: Tensor,
    scales: Tensor,
    n_out: int,
    bias: Tensor | None = None,
    gelu_tanh: bool = False,
) -> Tensor:
    """x [..., K] @ W (+ bias [N]) with W given as `quantize_q8(W)`, then GELU (tanh form)
    when asked: [..., n_out]. The arithmetic is fp32; only the weights are 8-bit."""
    library = _library()
    if library is None:
        raise RuntimeError("native CPU kernels are not available (see available())")
    tensors = (x,) if bias is None else (x, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("matmul_panels_q8 needs float32 CPU tensors (and int8 panels)")
    width = library.width
    k = x.shape[-1]
    if (
        q.dtype != torch.int8
        or q.device.type != "cpu"
        or q.dim() != 3
        or not q.is_contiguous()
        or q.shape[1:] != (k, width)
        or scales.dtype != torch.float16
        or scales.device.type != "cpu"
        or scales.shape != (q.shape[0], -(-k // Q8_BLOCK), width)
        or not scales.is_contiguous()
        or not (q.shape[0] - 1) * width < n_out <= q.shape[0] * width
        or (bias is not None and (bias.shape != (n_out,) or not bias.is_contiguous()))
    ):
        raise ValueError(
            f"unsupported shapes: x {tuple(x.shape)}, panels {tuple(q.shape)} {q.dtype}, "
            f"scales {tuple(scales.shape)} {scales.dtype}, n_out {n_out}, "
            f"bias {None if bias is None else tuple(bias.shape)}"
        )
    return _multiply(library, x, q, n_out, bias, gelu_tanh, scales)


class PanelWeight(WeightCopy):
    """A weight as column panels for matmul_panels; call it like `x @ weight (+ bias)`."""

    kernel = "C"  # what /health and the start-up log call this path

    def __init__(self, source: Tensor, out_in: bool = False) -> None:
        w = source.detach()
        w = w.t() if out_in else w  # [in, out]
        self.panels, self.n_out = pack_panels(w), w.shape[1]  # [P, in, NR]
        self.scales: Tensor | None = None  # fp32 panels; Int8PanelWeight's block scales
        super().__init__(source, out_in, torch.float32)

    def __call__(self, x: Tensor, bias: Tensor | None = None, gelu_tanh: bool = False) -> Tensor:
        # The panels were checked when they were made: only x and the bias are checked per
        # call, with the cheapest attributes (49 calls a llama-124m step; what a step spends
        # outside its products: bench/step_overhead.py). Anything unusual takes the checked
        # path, which says what is wrong.
        library = _library()
        if (
            library is not None
            and x.is_cpu
            and x.dtype == torch.float32
            and x.shape[-1] == self.panels.shape[1]
            and (
                bias is None
                or (
                    bias.is_cpu
                    and bias.dtype == torch.float32
                    and bias.shape == (self.n_out,)
                    and bias.is_contiguous()
                )
            )
        ):
            return _multiply(library, x, self.panels, self.n_out, bias, gelu_tanh, self.scales)
        return self._checked(x, bias, gelu_tanh)  # [..., out]

    def _checked(self, x: Tensor, bias: Tensor | None, gelu_tanh: bool) -> Tensor:
        return matmul_panels(x, self.panels, self.n_out, bias, gelu_tanh)


class Int8PanelWeight(PanelWeight):
    """A weight as 8-bit column panels with a scale per 32 weights (`quantize_q8`), for
    matmul_panels_q8; call it like `x @ weight (+ bias)`. A quarter of the fp32 panels'
    memory plus a sixteenth for the scales (q8_0's size); the arithmetic stays fp32."""

    kernel = "C int8"  # what /health and the start-up log call this path

    def __init__(self, source: Tensor, out_in: bool = False) -> None:
        w = source.detach()
        w = w.t() if out_in else w  # [in, out]
        self.panels, self.scales = quantize_q8(w)  # [P, in, NR] int8, [P, G, NR] fp16
        self.n_out = w.shape[1]
        WeightCopy.__init__(self, source, out_in, torch.float32)

    def _checked(self, x: Tensor, bias: Tensor | None, gelu_tanh: bool) -> Tensor:
        return matmul_panels_q8(x, self.panels, self.scales, self.n_out, bias, gelu_tanh)


def main(argv: list[str] | None = None) -> None:
    """Build the kernels' library ahead of time, for one CPU target."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("output", type=Path, help="where to write the shared library")
    parser.add_argument("--march", default="native", help="the CPU to build for (gcc -march)")
    args = parser.parse_args(argv)
    compiler = _compiler()
    if compiler is None:
        raise SystemExit("error: no C compiler found (set CC)")
    try:
        _compile(compiler, args.output.resolve(), args.march)
    except subprocess.CalledProcessError as e:
        first_line = (e.stderr.strip().splitlines() or ["no output"])[0]
        raise SystemExit(f"error: {compiler} failed: {first_line}") from None
    except OSError as e:  # the compiler cannot run, or the output folder cannot be written
        raise SystemExit(f"error: {e}") from None
    print(args.output)
