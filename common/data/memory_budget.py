"""Whether a site's large arrays (decoded images, trunk features) live in RAM or on its disk.

A site chooses with its ``storage`` setting: ``memory`` keeps them in RAM, ``disk`` keeps them
in memory-mapped files on the site's disk (the operating system pages rows in as training asks
for them and drops them again under memory pressure), ``auto`` (the default) picks ``disk`` when
an array would take more than a quarter of the memory available now.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Storage = Literal["auto", "memory", "disk"]
STORAGE_CHOICES: tuple[str, ...] = ("auto", "memory", "disk")

# An array may take this share of the memory available when the site opens its data.
AUTO_MEMORY_SHARE = 0.25


def available_memory_bytes() -> int | None:
    """Memory the system can give without swapping (Linux ``MemAvailable``); None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_storage(value: str) -> Storage:
    """``value`` as a storage choice, or a ValueError naming the accepted ones."""
    if value not in STORAGE_CHOICES:
        raise ValueError(f"storage {value!r} is not one of {', '.join(STORAGE_CHOICES)}")
    return value  # type: ignore[return-value]


def resolve_storage(requested: Storage, nbytes: int, what: str, available: int | None = None) -> Literal["memory", "disk"]:
    """``memory`` or ``disk`` for an array of ``nbytes`` (``what`` names it in the log)."""
    if requested != "auto":
        return requested
    available = available_memory_bytes() if available is None else available
    if available is None or nbytes <= AUTO_MEMORY_SHARE * available:
        return "memory"
    logger.info(
        "%s take %.1f GiB, more than %d%% of the %.1f GiB of memory available: kept on disk, memory-mapped",
        what, nbytes / 2**30, round(AUTO_MEMORY_SHARE * 100), available / 2**30,
    )
    return "disk"
