"""The registry of providers: adding a baseline is one module and one line here."""

from __future__ import annotations

from .base import Prepared, Provider, Unsupported
from .bundled import BundledKernel
from .fa4 import Fa4, Fa4Sparse
from .flash_attn_pkg import FlashAttn
from .flashinfer import FlashInferDecode, FlashInferSparse
from .flex import Flex, FlexFlash
from .sdpa import SdpaCudnn, SdpaEfficient, SdpaFlash, SdpaMath

PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls
    for cls in (BundledKernel, SdpaFlash, SdpaCudnn, SdpaEfficient, SdpaMath, Flex, FlexFlash,
                Fa4, Fa4Sparse, FlashInferSparse, FlashInferDecode, FlashAttn)
}

__all__ = ["PROVIDERS", "Prepared", "Provider", "Unsupported"]
