import pytest
from flwr.app import Context, Message, RecordDict

from mmn_fed import load_builtin
from server.engines.inprocess import as_stored, claim_task_identity


@pytest.fixture(scope="session")
def heart():
    df, schema = load_builtin("heart")
    return df, schema.subset(tasks=["disease"])


@pytest.fixture
def make_message():
    """Build an instruction Message outside a Flower process, as the in-process engine does: sent by the
    server (node 0) of run 1, with the message id a SuperLink would give it."""
    claim_task_identity(run_id=1, node_id=0)

    def make(message_type: str, content: RecordDict, node_id: int = 1000) -> Message:
        return as_stored(Message(content, dst_node_id=node_id, message_type=message_type, group_id="1"))

    return make


@pytest.fixture
def site_context(tmp_path):
    def make(df, name="site-a", run_config=None):
        path = tmp_path / f"{name}.csv"
        df.to_csv(path, index=False)
        return Context(run_id=1, node_id=1000, node_config={"data-path": str(path), "site-name": name},
                       state=RecordDict(), run_config=dict(run_config or {}))
    return make
