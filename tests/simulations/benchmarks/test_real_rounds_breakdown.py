"""The real-rounds benchmark's reading of the hospitals' logs (simulations.benchmarks.bench_real_rounds)."""

from __future__ import annotations

import pytest

from simulations.benchmarks.bench_real_rounds import message_breakdown, round_breakdown, summarize_breakdown

PER_MESSAGE_LOG = """\
INFO 2026-12-02 07:33:56,476:      [RUN 1, ROUND 2]
INFO 2026-12-02 07:33:56,476:      Receiving: train message (ID: a6)
INFO 2026-12-02 07:33:56,519:      Received successfully
INFO 2026-12-02 07:33:59,095:      Start `flwr-clientapp` process
DEBUG 2026-12-02 07:33:59,205:     Loading ClientApp `fedtl_real_app.client_app:app`
DEBUG 2026-12-02 07:34:15,507:     Finished task 5449875586365075218 of run 1
INFO 2026-12-02 07:34:15,617:      Sending: train message (ID: b7)
INFO 2026-12-02 07:34:16,118:      Sent successfully
"""

WARM_LOG = """\
\x1b[92mINFO 2026-12-02 07:40:15,277\x1b[0m:      [RUN 1, ROUND 3]
INFO 2026-12-02 07:40:15,277:      Receiving: evaluate message (ID: 62)
INFO 2026-12-02 07:40:15,354:      Received successfully
2026-12-02 07:40:21,184 client.clientapp_worker INFO task 12 evaluate: pull 1.080 s, load 0.000 s, handler 4.634 s, push 0.167 s
INFO 2026-12-02 07:40:21,879:      Sent successfully
"""


def test_a_per_message_process_splits_into_startup_app_import_with_handler_and_reply() -> None:
    [entry] = message_breakdown(PER_MESSAGE_LOG)

    assert (entry["type"], entry["round"]) == ("train", 2)
    assert entry["download_s"] == pytest.approx(0.043)
    assert entry["startup_s"] == pytest.approx(2.686)  # received -> the app starts loading
    assert entry["app_s"] == pytest.approx(16.302)
    assert entry["reply_s"] == pytest.approx(0.611)
    assert entry["total_s"] == pytest.approx(19.642)


def test_the_warm_worker_s_task_line_gives_the_handler_s_own_time() -> None:
    [entry] = message_breakdown(WARM_LOG)

    assert (entry["type"], entry["round"]) == ("evaluate", 3)
    assert entry["app_s"] == pytest.approx(4.634)
    assert entry["reply_s"] == pytest.approx(0.862)
    assert entry["startup_s"] == pytest.approx(21.184 - 0.167 - 4.634 - 15.354, abs=1e-3)


def test_what_a_round_holds_beyond_the_slowest_sites_messages_is_reported_as_between() -> None:
    per_site = {
        "h1": [{"type": "train", "round": 1, "download_s": 0, "startup_s": 1, "app_s": 3, "reply_s": 1, "total_s": 5},
               {"type": "evaluate", "round": 1, "download_s": 0, "startup_s": 1, "app_s": 1, "reply_s": 0, "total_s": 2}],
        "h2": [{"type": "train", "round": 1, "download_s": 0, "startup_s": 1, "app_s": 6, "reply_s": 1, "total_s": 8}],
    }

    [row] = round_breakdown(per_site, [14.0])

    assert row["train"]["total_s"] == 8  # the slowest site sets the exchange
    assert row["between_s"] == pytest.approx(14.0 - 8 - 2)
    assert summarize_breakdown([row])["between_s"] == pytest.approx(4.0)
