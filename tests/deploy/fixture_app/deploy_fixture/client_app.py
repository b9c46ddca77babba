"""Answer the fixture's train message with an echo that names this node and its site."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    greeting = str(msg.content["config"]["greeting"])
    site = str(context.node_config.get("site-name", "unknown"))
    # Node ids are unsigned 64-bit: they travel as text, not as a (signed) ConfigRecord integer.
    reply = ConfigRecord({"echo": f"{greeting} from node {context.node_id}", "site": site})
    return Message(content=RecordDict({"config": reply}), reply_to=msg)
