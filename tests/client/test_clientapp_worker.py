"""The long-lived ClientApp worker's own rules (client.clientapp_worker); serving real messages is
covered end to end by tests/deploy/test_real_federation.py."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from client.clientapp_worker import TaskTiming, forget_modules_under


def test_a_new_fabs_package_is_imported_afresh_once_the_old_fabs_modules_are_forgotten(tmp_path: Path) -> None:
    old_fab, new_fab = tmp_path / "fab-1", tmp_path / "fab-2"
    for fab, version in ((old_fab, 1), (new_fab, 2)):
        (fab / "bundle_under_test").mkdir(parents=True)
        (fab / "bundle_under_test" / "__init__.py").write_text(f"VERSION = {version}\n")
    sys.path.insert(0, str(old_fab))
    try:
        assert importlib.import_module("bundle_under_test").VERSION == 1

        forget_modules_under(old_fab.resolve())
        sys.path.insert(0, str(new_fab))

        assert "bundle_under_test" not in sys.modules
        assert str(old_fab) not in sys.path
        assert importlib.import_module("bundle_under_test").VERSION == 2
        assert "client.clientapp_worker" in sys.modules  # the site's own fedtl stays imported
    finally:
        sys.modules.pop("bundle_under_test", None)
        sys.path[:] = [entry for entry in sys.path if entry not in (str(old_fab), str(new_fab))]


def test_each_task_logs_where_its_time_went() -> None:
    line = TaskTiming(7, "train", pull_s=0.01, load_s=0.2, handler_s=3.5, push_s=0.1).line()

    assert line == "task 7 train: pull 0.010 s, load 0.200 s, handler 3.500 s, push 0.100 s"
