"""What the benchmarks share: model sizes, memory measures, timing, the result line and its JSON.

``--size tiny`` is the ``tiny`` profile (random, small); ``--size paper`` builds the paper's
architectures (SD 1.5 UNet / VAE / text encoder, CLIP ViT-L/14 vision tower) from
``fc_pipeline/configs/paper`` with random weights, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from fc_pipeline.model.components import build_component, build_fuser, clip_image_processor, load_components
from fc_pipeline.profiles import ModelProfile, get_profile, offline_clip_tokenizer_dir, paper_config
from fc_pipeline.settings import DTYPE_NAMES, torch_dtype
from fc_pipeline.storage import write_json

diffusers_logging.set_verbosity_error()  # casting random models warns about fp32-only modules they lack
SIZES = ("tiny", "paper")
DTYPES = {name: torch_dtype(name) for name in DTYPE_NAMES}
MODELS = ("vae", "text_encoder", "unet", "image_encoder", "fuser")


def benchmark_components(
    size: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[ModelProfile, dict]:
    """The profile (for its localisation layers and resolution) and the FastComposer components
    of a benchmark size, on ``device`` in ``dtype``; ``paper`` weights are random (seeded)."""
    if size == "tiny":
        profile = get_profile("tiny")
        components = load_components(profile, torch_dtype=dtype)
    elif size == "paper":
        from transformers import CLIPTokenizer

        profile = get_profile("paper")
        components = {}
        # built on the target device directly: an SD UNet initialises far faster on a GPU
        with torch.random.fork_rng(devices=[]), torch.device(device):
            for offset, name in enumerate(("vae", "text_encoder", "unet", "image_encoder")):
                torch.manual_seed(seed + offset)
                components[name] = build_component(name, paper_config(name))
            components["fuser"] = build_fuser(components["text_encoder"], components["image_encoder"])
        components["scheduler"] = build_component("scheduler", paper_config("scheduler"))
        components["tokenizer"] = CLIPTokenizer.from_pretrained(offline_clip_tokenizer_dir())  # SD's BPE
        components["feature_extractor"] = clip_image_processor()
    else:
        raise ValueError(f"unknown --size {size!r}; choose one of {SIZES}")
    for name in MODELS:
        components[name].to(device, dtype)
    return profile, components


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created and still alive while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage (a view, an alias of a weight, an in-place result) is no new memory
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.untyped_storage().data_ptr() not in inputs
                and tensor.untyped_storage() not in self.live
            ):
                storage = tensor.untyped_storage()
                self.live[storage] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, storage.nbytes())
        return out


def transient_peak_bytes(run: Callable[[], Any], device: str) -> int:
    """Peak memory a call adds on top of what was allocated before it: on CUDA
    ``torch.cuda.max_memory_allocated``; on the CPU the peak of live tensor storage it creates."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakTensorMemory() as memory:
        run()
    return memory.peak


def parameter_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters of some modules."""
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def synchronize(device: str) -> None:
    """Wait for queued CUDA work (timings end when the device is done)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Wall time of one call, device work included, and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


def seconds(run: Callable[[], Any], device: str) -> float:
    """Wall time of one call, device work included."""
    return timed(run, device)[0]


def alternate(contenders: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per contender over ``repeats`` rounds that run each once, in turn (so a load
    change hits all alike), after one warm-up round."""
    for run in contenders.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            times[name].append(seconds(run, device))
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> str:
    """The device the figures come from, in words."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def write_result(path: str | Path | None, name: str, line: str, figures: dict) -> None:
    """Print the result line; with ``path``, merge ``{name: {line, figures, machine, date}}`` into
    that JSON file (written atomically)."""
    print(line, flush=True)
    if path is None:
        return
    path = Path(path)
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = {"line": line, "machine": machine(), "date": today(), "torch": torch.__version__, **figures}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(results, path)
