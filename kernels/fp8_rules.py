"""The fp8 forward's launch-config rules, registered with :mod:`kernels.configs` (which
:mod:`kernels.fp8` imports, so it cannot import them itself): :func:`kernels.config_problems` and
:func:`kernels.default_config` for kernel "fp8" are :func:`kernels.fp8.fp8_config_problems` and
:func:`kernels.fp8.fp8_default_config`. Imported by the package, for that alone."""

from __future__ import annotations

import torch

from . import configs
from .configs import LaunchConfig
from .fp8 import fp8_config_problems, fp8_default_config, fp8_triton_default


def _default(device: torch.device, block_size: int, head_dim: int,
             allow_gluon: bool) -> LaunchConfig:
    pick = fp8_default_config if allow_gluon else fp8_triton_default
    return pick(device, block_size, head_dim)


configs.register_rules("fp8", fp8_config_problems, _default)
