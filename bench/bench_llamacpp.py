"""Atlas vs llama.cpp on this machine's CPU: same weights, same greedy tokens, tokens/s.

What it does: builds llama.cpp once from the `llama-cpp-python` source distribution
(`pip download --no-binary`; only the `llama` shared library, cached under
`$ATLAS_HOME/llamacpp/VERSION`, default `~/.cache/atlas`; `CMAKE_ARGS` adds CMake options),
loads it through that package's own ctypes bindings, exports the model with
`atlas checkpoint export-gguf` (f32, or `--type`; with `--type q8_0` Atlas serves the
same 8-bit numbers, `model.quantize = "int8"`, unless `--quantize none`), then in the same
run:
  1. checks llama.cpp's greedy tokens equal Atlas's (`Transformer.generate`, the KV-cache
     path with Atlas's CPU kernels) for every prompt; with f32 weights and an f32 KV
     cache both compute the same function, so they must agree (a divergence is printed
     with the position and Atlas's top-2 logit margin there, and fails the run), except
     that llama.cpp's CPU GELU goes through an fp16 table, so GELU models (GPT-2,
     Pythia) may flip near-ties: for them a divergence is reported, not fatal;
  2. measures greedy decode tokens/s at batch 1 and batched (`--batch` sequences decoding
     together: one `llama_decode` per step with one token per sequence; Atlas's engine with
     as many concurrent requests), both with `--threads` threads.
Decode rate excludes the prompt: tokens after the first over the time from each side's
first token to its last (as bench/bench_engine.py). Repeats interleave and keep the best.
llama.cpp runs in a child process of its own (this script with `--worker`): its OpenMP
runtime and PyTorch's are different libraries, and in one process the two thread teams
spin against each other (bench/omp_teams.py shows the same effect within PyTorch).

The model: `--checkpoint DIR` (any exportable atlas checkpoint), else a random-weight
model from `--preset` (default gpt2-124m) with a 1024-id tokenizer trained on stdlib text.
With q8_0 the tokens may differ without failing the run: llama.cpp also rounds each
activation row (and the token embeddings) to 8 bits, where Atlas keeps them fp32. So for
models with an untied head the run also has llama.cpp decode an f32 file of the 8-bit
matrices' own numbers (dequantized), whose tokens Atlas's int8 ones must equal (it fails
otherwise): the check that Atlas computes with exactly llama.cpp's q8_0 weights.
What it does not do: GPU, sampling, prompt-processing speed, or quantized-vs-f32 accuracy
(bench/bench_int8.py measures that for Atlas's int8).

Run:  python bench/bench_llamacpp.py --quick         (builds llama.cpp the first time)
      python bench/bench_llamacpp.py --preset llama-124m --type q8_0
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from progress import positive  # noqa: E402  (no PyTorch: the llama.cpp worker imports this file)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Only the `llama` library: no tools, tests, server or curl/openssl. GGML_NATIVE builds for
# this CPU (AVX2/AVX-512 where present), as a local llama.cpp build would.
BASE_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_OPENMP=ON",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_llamacpp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="atlas checkpoint (default: --preset, random)")
    p.add_argument("--preset", default="gpt2-124m", help="model preset when no --checkpoint")
    p.add_argument(
        "--weight-scale",
        type=float,
        default=4.0,
        help="random models: matrices scaled up so greedy text varies (default 4)",
    )
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF tensors")
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default=None,
        help="Atlas's weights: int8 (the same q8_0 numbers) by default with --type q8_0, else none",
    )
    p.add_argument("--threads", type=positive, default=min(2, os.cpu_count() or 1))
    p.add_argument("--batch", type=positive, default=8, help="sequences decoding together")
    p.add_argument("--prompt-tokens", type=positive, default=16)
    p.add_argument("--new-tokens", type=positive, default=None, help="default 64 (--quick 24)")
    p.add_argument("--repeats", type=positive, default=None, help="default 3 (--quick 1)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    p.add_argument(
        "--cache", type=Path, default=None, help="build cache (default $ATLAS_HOME/llamacpp)"
    )
    p.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist")
    p.add_argument("--jobs", type=positive, default=os.cpu_count() or 1, help="build jobs")
    p.add_argument("--build-only", action="store_true", help="build llama.cpp, then stop")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own log")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        p.error(f"--checkpoint {args.checkpoint} is not an atlas checkpoint (no config.json)")
    if args.checkpoint is None and args.worker is None and not args.build_only:
        from progress import check_preset  # loads PyTorch, which the worker must not

        check_preset(p, args.preset)  # now, not after minutes of building llama.cpp
    if args.json is not None and not args.json.parent.is_dir():
        p.error(f"--json: folder {args.json.parent} does not exist")
    args.new_tokens = args.new_tokens or (24 if args.quick else 64)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the rate is measured after the first)")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.quantize = args.quantize or ("int8" if args.type == "q8_0" else "none")
    home = Path(os.environ.get("ATLAS_HOME", Path.home() / ".cache" / "atlas"))
    args.cache = args.cache or home / "llamacpp"
    return args


# --- building llama.cpp --------------------------------------------------------------------
def cmake_args() -> list[str]:
    """The fixed options plus the user's CMAKE_ARGS (later options win in CMake)."""
    return BASE_CMAKE_ARGS + shlex.split(os.environ.get("CMAKE_ARGS", ""))


def ensure_llamacpp(cache: Path, version: str, jobs: int) -> tuple[Path, Path]:
    """(folder of libllama.so, folder holding the `llama_cpp` bindings); built once."""
    root = cache / version
    src, build = root / "src", root / "build"
    marker = root / "built.json"
    wanted = {"version": version, "cmake_args": cmake_args()}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return build / "bin", src
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(
            dir=cache.parent if cache.parent.exists() else None
        ) as tmp:
            print(f"downloading llama-cpp-python {version} (source) ...", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    "--quiet",
                    f"llama-cpp-python=={version}",
                    "-d",
                    tmp,
                ],
                check=True,
            )
            (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(src, ignore_errors=True)
            shutil.move(str(Path(tmp) / archive.name.removesuffix(".tar.gz")), src)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama.cpp in {build} (one time; minutes on a few cores) ...", flush=True)
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src / "vendor" / "llama.cpp"),
            "-B",
            str(build),
            *generator,
            *cmake_args(),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama", "-j", str(jobs)], check=True
    )
    marker.write_text(json.dumps(wanted, indent=2))
    return build / "bin", src


def load_bindings(lib_dir: Path, package_root: Path):
    """llama-cpp-python's low-level ctypes module over our libllama.so.

    The package's __init__ also imports its high-level API and that API's dependencies;
    the low-level module needs none of them, so it is imported under a bare package.
    """
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    package = types.ModuleType("llama_cpp")
    package.__path__ = [str(package_root / "llama_cpp")]
    sys.modules["llama_cpp"] = package
    return importlib.import_module("llama_cpp.llama_cpp")


class LlamaCpp:
    """One llama.cpp model and context: greedy decoding of several sequences in lockstep."""

    def __init__(
        self, ll, gguf_path: Path, n_ctx: int, n_seq: int, threads: int, verbose: bool = False
    ) -> None:
        self.ll = ll
        ll.llama_backend_init()
        if not verbose:
            self._quiet = ll.llama_log_callback(lambda level, text, data: None)
            ll.llama_log_set(self._quiet, ctypes.c_void_p())
        self.model = ll.llama_model_load_from_file(
            str(gguf_path).encode(), ll.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        params = ll.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, n_ctx
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = ll.GGML_TYPE_F32  # Atlas keeps an fp32 KV cache
        params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = ll.llama_batch_init(n_ctx, 0, n_seq)
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Run (token, position, sequence, wants logits) entries; logits rows in order."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        rows = []
        for i, (*_, logits) in enumerate(entries):
            if logits:
                ptr = self.ll.llama_get_logits_ith(self.ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return rows

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
        """Greedy continuations of all prompts together, and the decode rate (tokens/s)."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        entries = [
            (t, p, s, p == len(prompt) - 1)
            for s, prompt in enumerate(prompts)
            for p, t in enumerate(prompt)
        ]
        outs = [[int(row.argmax())] for row in self._decode(entries)]
        start = time.perf_counter()
        for step in range(1, new_tokens):
            entries = [
                (out[-1], len(p) + step - 1, s, True)
                for s, (p, out) in enumerate(zip(prompts, outs, strict=True))
            ]
            for out, row in zip(outs, self._decode(entries), strict=True):
                out.append(int(row.argmax()))
        elapsed = time.perf_counter() - start
        return outs, len(prompts) * (new_tokens - 1) / elapsed


# --- the comparison ------------------------------------------------------------------------
def atlas_model(args):
    import torch

    from atlas_server.checkpoint import load_checkpoint, save_checkpoint
    from atlas_server.model import Transformer, load_preset
    from atlas_server.tokenizer import TrainConfig, train_from_texts
    from atlas_server.tokenizer.corpus import stdlib_sample

    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint)
        return ckpt.model, ckpt.tokenizer, args.checkpoint, None
    # llama.cpp's BPE needs merges: a small tokenizer trained on stdlib text (the model
    # keeps the preset's embedding rows; ids past the tokenizer are padding in the GGUF).
    tokenizer = train_from_texts(stdlib_sample(200_000), TrainConfig(vocab_size=1024))
    torch.manual_seed(0)
    config = load_preset(args.preset)
    if config.vocab_size < tokenizer.vocab_size:  # the tiny presets
        config = config.replace(vocab_size=tokenizer.vocab_size)
    model = Transformer(config).eval()
    with torch.no_grad():  # at the init scale greedy text repeats one token: a weak check
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(args.weight_scale)
    tmp = Path(tempfile.mkdtemp(prefix="bench_llamacpp."))
    path = save_checkpoint(tmp / args.preset, model, tokenizer, {"source": "bench_llamacpp.py"})
    return model, tokenizer, path, tmp


def dequantized_checkpoint(model, tokenizer, work: Path) -> Path:
    """A checkpoint of `model` whose matrices are the numbers its int8 copies hold (the q8_0
    weights, dequantized), in fp32; the embedding as it is (Atlas's lookup stays fp32)."""
    import copy

    import torch

    from atlas_server.checkpoint import save_checkpoint
    from atlas_server.model import native
    from atlas_server.model.transformer import Linear

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, Linear):
                k, n = module.weight.shape
                q, scales = native.quantize_q8(module.weight)
                module.weight.copy_(native.dequantize_q8(q, scales, k, n))
    return save_checkpoint(work / "dequantized", twin, tokenizer, {"source": "bench_llamacpp.py"})


def first_divergence(model, prompt: list[int], ours: list[int], theirs: list[int]) -> str:
    import torch

    k = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ours[:k]]))[0, -1]
    top = logits.topk(2).values
    margin, scale = float(top[0] - top[1]), float(logits.abs().max())
    return (
        f"token {k}: Atlas {ours[k]}, llama.cpp {theirs[k]}; Atlas's top-2 margin {margin:.2e} "
        f"({margin / scale:.1e} of the largest logit, {scale:.1f})"
    )


def worker(args: argparse.Namespace, lib_dir: Path, package_root: Path) -> None:
    """Child process: read {gguf, prompts, new_tokens, n_ctx} from the --worker JSON file,
    decode greedily with llama.cpp, print {tokens, tok_s} as JSON (no PyTorch loaded)."""
    job = json.loads(args.worker.read_text())
    ll = load_bindings(lib_dir, package_root)
    cpp = LlamaCpp(
        ll, Path(job["gguf"]), job["n_ctx"], len(job["prompts"]), args.threads, args.verbose
    )
    tokens, rate = cpp.greedy(job["prompts"], job["new_tokens"])
    cpp.close()
    print(json.dumps({"tokens": tokens, "tok_s": rate}))


def llamacpp_run(args, gguf: Path, prompts: list[list[int]], new_tokens: int, work: Path):
    """(greedy tokens, decode tok/s) from llama.cpp in a fresh child process."""
    job = work / "job.json"
    n_ctx = len(prompts) * (len(prompts[0]) + new_tokens)
    job.write_text(
        json.dumps(
            {"gguf": str(gguf), "prompts": prompts, "new_tokens": new_tokens, "n_ctx": n_ctx}
        )
    )
    command = [
        sys.executable,
        __file__,
        "--worker",
        str(job),
        "--threads",
        str(args.threads),
        "--cache",
        str(args.cache),
        "--version",
        args.version,
    ]
    done = subprocess.run(
        command + (["--verbose"] if args.verbose else []),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"the llama.cpp worker failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["tokens"], result["tok_s"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lib_dir, package_root = ensure_llamacpp(args.cache, args.version, args.jobs)
    if args.build_only:
        print(f"llama.cpp library in {lib_dir}")
        return
    if args.worker is not None:
        return worker(args, lib_dir, package_root)

    import torch
    from bench_engine import atlas_decode_rate

    from atlas_server.compute_threads import call_in_fresh_thread
    from atlas_server.engine import Engine, EngineConfig
    from atlas_server.gguf_export import export_gguf

    torch.set_num_threads(args.threads)
    model, tokenizer, ckpt_path, tmp = call_in_fresh_thread(atlas_model, args)
    work = Path(tempfile.mkdtemp(prefix="bench_llamacpp_gguf."))
    try:
        gguf_path = export_gguf(ckpt_path, work / f"model-{args.type}.gguf", args.type)
        model.prepare_for_inference(quantize=args.quantize)
        gen = torch.Generator().manual_seed(1)
        vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        prompts = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=gen).tolist()

        # 1. the same greedy tokens
        theirs, _ = llamacpp_run(args, gguf_path, prompts, args.new_tokens, work)
        ours = [call_in_fresh_thread(model.generate, p, args.new_tokens) for p in prompts]
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        divergences = [
            first_divergence(model, p, a, b)
            for p, a, b in zip(prompts, ours, theirs, strict=True)
            if a != b
        ]

        # 1b. with int8: the same greedy tokens as llama.cpp running the 8-bit matrices'
        # numbers as f32 (its q8_0 path also rounds activations, so it may differ)
        same_dequantized = None
        if args.quantize == "int8" and not model.config.tie_embeddings:
            path = dequantized_checkpoint(model, tokenizer, work)
            f32_file = export_gguf(path, work / "model-dequantized-f32.gguf", "f32")
            tokens, _ = llamacpp_run(args, f32_file, prompts, args.new_tokens, work)
            same_dequantized = sum(a == b for a, b in zip(ours, tokens, strict=True))

        # 2. decode speed, batch 1 and batched, interleaved repeats, best kept
        config = EngineConfig(
            max_running=args.batch,
            max_batched_tokens=max(512, args.batch * args.prompt_tokens),
            max_model_len=args.prompt_tokens + args.new_tokens,
            quantize=args.quantize,
        )

        def atlas_rate(batch: int, n: int) -> float:
            engine = call_in_fresh_thread(lambda: Engine(model, tokenizer, config).start())
            try:
                return atlas_decode_rate(engine, prompts[:batch], n)
            finally:
                engine.shutdown()

        results = {}
        for batch in sorted({1, args.batch}):
            atlas_rate(batch, 4)  # warm-up (llama.cpp's child starts cold every time)
            atlas_rates, cpp_rates = [], []
            for _ in range(args.repeats):
                atlas_rates.append(atlas_rate(batch, args.new_tokens))
                cpp_rates.append(
                    llamacpp_run(args, gguf_path, prompts[:batch], args.new_tokens, work)[1]
                )
            results[f"batch_{batch}"] = {
                "atlas_tok_s": round(max(atlas_rates), 1),
                "llamacpp_tok_s": round(max(cpp_rates), 1),
                "ratio": round(max(atlas_rates) / max(cpp_rates), 2),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    report = {
        "model": str(args.checkpoint) if args.checkpoint else f"{args.preset} (random weights)",
        "parameters": model.num_parameters(),
        "gguf_type": args.type,
        "atlas_quantize": args.quantize,
        "llama_cpp_python": args.version,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "greedy_identical": f"{same}/{len(prompts)}",
        **(
            {"greedy_identical_to_dequantized_f32": f"{same_dequantized}/{len(prompts)}"}
            if same_dequantized is not None
            else {}
        ),
        "divergences": divergences,
        **results,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=2))
    print("\n| batch | Atlas tok/s | llama.cpp tok/s | Atlas / llama.cpp |\n|---|---|---|---|")
    for key, row in results.items():
        print(
            f"| {key.removeprefix('batch_')} | {row['atlas_tok_s']} | {row['llamacpp_tok_s']} | {row['ratio']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if same_dequantized is not None and same_dequantized != len(prompts):
        sys.exit(
            f"bench_llamacpp.py: Atlas's int8 tokens differ from llama.cpp's on the same "
            f"8-bit matrices in f32 for {len(prompts) - same_dequantized} prompt(s)"
        )
    if args.type == "f32" and same != len(prompts):
        if model.config.mlp in ("gelu", "gelu_exact"):
            # ggml's CPU GELU rounds its f32 input to fp16 and reads a table (GGML_GELU_FP16
            # in ggml-cpu/vec.h): near-ties can flip; SiLU (Llama, Qwen2) is computed in f32.
            print(
                "note: llama.cpp computes GELU through an fp16 table even in f32 files; "
                "the divergences above are near-ties (see their relative margins)"
            )
        else:
            sys.exit(f"bench_llamacpp.py: greedy tokens differ for {len(prompts) - same} prompt(s)")


if __name__ == "__main__":
    main()
