"""`flask seed`: the sample data, added once."""

from rq_scheduler import Scheduler

from app.messaging.triggers import dispatch_job_id


def test_seed_adds_the_sample_data_once_with_a_trigger_for_the_scheduled_campaign(client, runner, redis_conn, app):
    first = runner.invoke(args=["seed"])
    assert first.exit_code == 0 and "seeded 5 customers and 3 campaigns" in first.output
    campaigns = client.get("/campaigns").get_json()["data"]
    assert sorted(c["status"] for c in campaigns) == ["draft", "draft", "scheduled"]
    assert client.get("/customers").get_json()["pagination"]["total"] == 5
    scheduled = next(c for c in campaigns if c["status"] == "scheduled")
    scheduler = Scheduler(queue_name=app.config["CONTROL_QUEUE"], connection=redis_conn)
    assert dispatch_job_id(scheduled["id"]) in [job.id for job in scheduler.get_jobs()]

    again = runner.invoke(args=["seed"])
    assert again.exit_code == 0 and "seeded 0 customers and 0 campaigns" in again.output
    assert client.get("/customers").get_json()["pagination"]["total"] == 5
