"""The two Flower internals the in-process engine relies on (server/engines/inprocess.py): if a Flower
upgrade changes them, these tests say which function to update, before any federation test fails obscurely."""
import flwr
from flwr.app import ConfigRecord, Error, Message, RecordDict

from server.engines.inprocess import as_stored, claim_task_identity

FIX = f"(flwr {flwr.__version__}); update server/engines/inprocess.py::%s"


def test_claim_task_identity_sets_the_sender_of_new_messages():
    for run_id, node_id in ((7, 42), (1, 0)):
        claim_task_identity(run_id, node_id)
        md = Message(RecordDict(), dst_node_id=3, message_type="train").metadata
        assert (md.run_id, md.src_node_id, md.dst_node_id) == (run_id, node_id, 3), (
            "Message() no longer takes its sender from flwr.supercore.task_identity.TaskIdentity "
            + FIX % "claim_task_identity")


def test_as_stored_gives_a_new_message_id_and_keeps_everything_else():
    claim_task_identity(1, 0)
    sent = Message(RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=1000, message_type="train",
                   group_id="3", ttl=60.0)
    stored = as_stored(sent)
    broken = "as_stored no longer copies a message's metadata " + FIX % "as_stored"
    fields = ("run_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id", "created_at", "ttl",
              "message_type", "src_task_id", "dst_task_id")
    assert {f: getattr(stored.metadata, f) for f in fields} == {f: getattr(sent.metadata, f) for f in fields}, broken
    assert sent.metadata.message_id == "" and len(stored.metadata.message_id) == 32, broken
    assert as_stored(sent).metadata.message_id != stored.metadata.message_id, broken
    assert stored.content is sent.content and stored.content["config"]["a"] == 1
    other = RecordDict()
    assert as_stored(sent, other).content is other
    # a reply to the stored message answers it by id, from the node it was sent to
    reply = as_stored(Message(RecordDict(), reply_to=stored))
    assert reply.metadata.reply_to_message_id == stored.metadata.message_id, broken
    assert (reply.metadata.src_node_id, reply.metadata.dst_node_id) == (1000, 0)
    assert reply.metadata.message_id not in ("", stored.metadata.message_id)
    failed = as_stored(Message(Error(code=0, reason="site down"), reply_to=stored))
    assert failed.has_error() and failed.error.reason == "site down" and not failed.has_content()
