"""A site keeps an array in RAM unless it would crowd the memory, or the site says otherwise."""

from __future__ import annotations

import pytest

from common.data.memory_budget import available_memory_bytes, check_storage, resolve_storage

GIB = 2**30


def test_auto_keeps_an_array_in_memory_up_to_a_quarter_of_the_memory_available() -> None:
    assert resolve_storage("auto", 2 * GIB, "features", available=8 * GIB) == "memory"
    assert resolve_storage("auto", 2 * GIB + 1, "features", available=8 * GIB) == "disk"


def test_an_explicit_choice_is_kept_whatever_the_memory() -> None:
    assert resolve_storage("memory", 100 * GIB, "features", available=1 * GIB) == "memory"
    assert resolve_storage("disk", 1, "features", available=100 * GIB) == "disk"


def test_the_disk_choice_is_logged_with_the_sizes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        resolve_storage("auto", 3 * GIB, "trunk features", available=4 * GIB)
    assert "trunk features take 3.0 GiB, more than 25% of the 4.0 GiB" in caplog.text


def test_this_machine_reports_its_available_memory() -> None:
    available = available_memory_bytes()
    assert available is not None and available > 0


def test_an_unknown_storage_value_names_the_accepted_ones() -> None:
    assert check_storage("disk") == "disk"
    with pytest.raises(ValueError, match="'ssd' is not one of auto, memory, disk"):
        check_storage("ssd")
