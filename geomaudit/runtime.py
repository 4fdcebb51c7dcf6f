"""Device and precision of an audit (SPEC §2): fp32 by default, tf32 matmuls on request, or fp64."""

import torch

from .errors import UsageError

PRECISIONS = ("fp32", "tf32", "fp64")
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a device torch knows") from err
    if device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {name}: audits run on {' or '.join(DEVICE_TYPES)}, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but torch sees no CUDA device")
    return device


def set_precision(precision: str) -> torch.dtype:
    """Set the matmul mode for ``precision`` and return the dtype models and float data are cast to."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    return torch.float64 if precision == "fp64" else torch.float32


def check_seed(seed: int) -> int:
    """A seed torch and numpy both take: 0 … 2**64 - 1."""
    if not 0 <= seed < 2**64:
        raise UsageError(f"--seed must lie in 0 … 2**64 - 1, got {seed}")
    return seed
