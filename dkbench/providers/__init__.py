"""The registry of providers: adding a baseline is one module and one line here."""

from __future__ import annotations

from .base import Prepared, Provider, Unsupported
from .bundled import BundledKernel
from .flash_attn_pkg import FlashAttn
from .flex import Flex
from .sdpa import SdpaCudnn, SdpaEfficient, SdpaFlash, SdpaMath

PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls
    for cls in (BundledKernel, SdpaFlash, SdpaCudnn, SdpaEfficient, SdpaMath, Flex, FlashAttn)
}

__all__ = ["PROVIDERS", "Prepared", "Provider", "Unsupported"]
