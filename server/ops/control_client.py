"""Flower's own Control API client for the coordinator's loopback SuperLink, used in-process.

``flwr`` commands cost a Python start each (seconds here); the coordinator's commands that poll
(``run`` following a run) or need fields ``flwr`` does not print (``hospitals``: the name a key was
registered with) call the same API through Flower's client and the coordinator's connection profile
(``STATE_DIR/flwr-home/config.toml``), so they too work on the coordinator machine only.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

from server.ops.coordinator_settings import PROFILE_NAME, CoordinatorError, CoordinatorSettings


@contextlib.contextmanager
def control_client(settings: CoordinatorSettings) -> Iterator[Any]:
    """Flower's Control API client for the loopback SuperLink, through the coordinator's profile."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    if not (settings.flwr_home / "config.toml").exists():
        raise CoordinatorError(
            f"no connection profile in {settings.flwr_home}; this works on the coordinator machine only, after "
            f"'fedtl-coordinator start --state-dir {settings.state_dir}'"
        )
    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(settings.flwr_home)
    client = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Flower prints "Using SuperLink: ..." here
            client = init_http_client_from_connection(read_superlink_connection(PROFILE_NAME))
        yield client
    except CoordinatorError:
        raise
    except Exception as exc:  # Flower's client raises its own types for an unreachable SuperLink
        raise CoordinatorError(
            f"the SuperLink at {settings.link_address} did not answer ({type(exc).__name__}); is "
            f"'fedtl-coordinator start --state-dir {settings.state_dir}' running?"
        ) from None
    finally:
        if client is not None:
            client.close()
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous
