"""A worker killed between taking a job off the queue and starting it leaves the job "queued" in the
queue's intermediate list, where nothing runs it: the reconciler treats it as lost."""

from rq import Queue

from app.messaging.reconcile import reconcile
from tests.factories import make_campaign, make_customers


def test_job_stranded_by_a_dead_worker_is_requeued(app, client, clock, redis_conn, work):
    ids = make_customers(3)
    campaign_id = make_campaign().id
    assert client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids}).status_code == 202
    queue = Queue("campaign_sends", connection=redis_conn)
    # What a worker's dequeue does before it dies: one job moves to the intermediate list.
    stranded = redis_conn.lmove(queue.key, queue.intermediate_queue_key).decode()
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)

    assert reconcile().requeued == 1
    assert stranded in queue.job_ids
    work()
    assert client.get(f"/campaigns/{campaign_id}").get_json()["status"] == "sent"
