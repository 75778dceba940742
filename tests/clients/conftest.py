import uuid

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from mmn_fed import load_builtin


@pytest.fixture(scope="session")
def heart():
    df, schema = load_builtin("heart")
    return df, schema.subset(tasks=["disease"])


@pytest.fixture
def make_message():
    """Build an instruction Message outside a Flower process: Message() reads the sender's identity
    from TaskIdentity (set by Flower's processes), and a reply needs the message id the SuperLink sets."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

    def make(message_type: str, content: RecordDict, node_id: int = 1000) -> Message:
        msg = Message(content, dst_node_id=node_id, message_type=message_type, group_id="1")
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return msg

    return make


@pytest.fixture
def site_context(tmp_path):
    def make(df, name="site-a", run_config=None):
        path = tmp_path / f"{name}.csv"
        df.to_csv(path, index=False)
        return Context(run_id=1, node_id=1000, node_config={"data-path": str(path), "site-name": name},
                       state=RecordDict(), run_config=dict(run_config or {}))
    return make
