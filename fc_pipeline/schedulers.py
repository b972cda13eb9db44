"""Samplers: the scheduler a checkpoint ships for inference, and swapping it by name.

Training adds noise with ``DDPMScheduler``; a checkpoint ships the sampler Stable Diffusion 1.5
ships for inference (``PNDMScheduler`` with ``skip_prk_steps``). Any diffusers scheduler can
replace it, configured ``from_config`` of the same noise schedule. Imports diffusers lazily so the
CLI can list the names instantly.
"""

from __future__ import annotations

from typing import Any

# short names of `fc-pipeline generate/evaluate --scheduler`; a diffusers class name works too
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm_single": "DPMSolverSinglestepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "kdpm2_a": "KDPM2AncestralDiscreteScheduler",
}
# what stable-diffusion-v1-5's scheduler/scheduler_config.json sets on top of the noise schedule
SD15_INFERENCE_SETTINGS = {"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of a short name (``SCHEDULERS``) or of a class name."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cls = getattr(diffusers, SCHEDULERS.get(name.lower(), name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name"
        )
    return cls


def make_scheduler(name: str, config: Any):
    """Scheduler ``name`` configured ``from_config`` of another scheduler's ``config`` (same noise
    schedule); PNDM as Stable Diffusion 1.5 runs it (PLMS steps only)."""
    cls = scheduler_class(name)
    if cls.__name__ == "PNDMScheduler":
        return inference_scheduler(config)
    return cls.from_config(config)


def inference_scheduler(config: Any):
    """The sampler a checkpoint ships: SD 1.5's ``PNDMScheduler`` over the training noise schedule ``config``."""
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(config, **SD15_INFERENCE_SETTINGS)


def with_scheduler(pipe, name: str | None):
    """Swap ``pipe``'s scheduler (in place) for scheduler ``name``; ``None`` keeps it. Returns ``pipe``."""
    if name is not None:
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe
