"""Adapter name → class. The core asks here; it never names a vendor itself."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labsync.config import LisConfig
    from labsync.lis.base import LisClient

# name → "module:Class", imported on demand so an adapter's dependencies load only when used
_ADAPTERS: dict[str, str] = {
    "qlab": "labsync.lis.qlab:QlabClient",
}


def adapter_names() -> list[str]:
    return sorted(_ADAPTERS)


def make_client(config: LisConfig, **options: Any) -> LisClient:
    """The configured adapter. ``config.adapter`` was validated against ``adapter_names()``.

    ``options`` go to the adapter's constructor; every adapter takes ``sleep`` (the function
    its retry waits use, so a stopping daemon can cut them short).
    """
    module_name, class_name = _ADAPTERS[config.adapter].split(":")
    cls = getattr(import_module(module_name), class_name)
    return cls(config, **options)  # type: ignore[no-any-return,unused-ignore]
