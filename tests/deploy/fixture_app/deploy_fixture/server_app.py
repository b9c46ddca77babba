"""Send one train message to every connected node; fail the run unless each one replies correctly."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    expected = int(context.run_config["expected-nodes"])
    deadline = time.monotonic() + float(context.run_config["wait-for-nodes-s"])
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < expected:
        raise RuntimeError(f"only {len(node_ids)} of {expected} nodes connected")

    messages = []
    for node_id in node_ids:
        content = RecordDict({"config": ConfigRecord({"greeting": "hello"})})
        messages.append(Message(content=content, dst_node_id=node_id, message_type="train"))
    replies = list(grid.send_and_receive(messages, timeout=float(context.run_config["reply-timeout-s"])))

    answered = {reply.metadata.src_node_id for reply in replies if reply.has_content()}
    if answered != set(node_ids):
        raise RuntimeError(f"nodes {sorted(set(node_ids) - answered)} did not reply")
    for reply in replies:
        echoed = reply.content["config"]["echo"]
        if echoed != f"hello from node {reply.metadata.src_node_id}":
            raise RuntimeError(f"unexpected reply {echoed!r}")
    print(f"fixture run complete: {len(replies)} replies")
