"""The durable job store: persisted before acknowledged, idempotency keys, one claimant per job, leases that
expire (also after kill -9), results committed once, cancel, priorities, model affinity, per-user limits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fixtures.postgres import postgres_schema
from imagesmith.core.errors import BadRequest, NotFound
from imagesmith.serve.store import JobStore, QueueFull

HEAD = "0006"  # the newest migration (0002: uploads, 0003: jobs.batch_key, 0004: queue_state, 0005: a1111_options,
#                 0006: output_blobs)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    with postgres_schema() as pg_url:
        if pg_url is None:
            pytest.skip("PostgreSQL is not running on loopback")
        yield pg_url


def test_jobs_survive_a_restart_and_keys_are_idempotent(url):
    a = JobStore(url)
    job, created = a.submit("generate", {"prompt": "x"}, idempotency_key="k1")
    again, created2 = a.submit("generate", {"prompt": "other"}, idempotency_key="k1")
    assert created and not created2 and again["id"] == job["id"] and again["request"] == {"prompt": "x"}
    other_user, created3 = a.submit("generate", {"prompt": "x"}, idempotency_key="k1", user="bob")
    assert created3 and other_user["id"] != job["id"]  # keys are per user
    b = JobStore(url)  # a restarted server on the same database
    assert b.get(job["id"])["status"] == "queued"
    assert b.claim("w1")["id"] == job["id"]
    with pytest.raises(NotFound):
        b.get(job["id"], user="bob")  # isolation by user


def test_one_claimant_priorities_and_model_affinity(url):
    s = JobStore(url)
    low, _ = s.submit("generate", {}, priority=0, model="m1")
    high, _ = s.submit("generate", {}, priority=5, model="m2")
    mine, _ = s.submit("generate", {}, priority=0, model="m3")
    assert s.claim("w1", loaded_models=("m3",))["id"] == mine["id"]  # its loaded model first
    assert s.claim("w2")["id"] == high["id"]  # then priority
    assert s.claim("w3")["id"] == low["id"]
    assert s.claim("w4") is None
    assert s.depth() == {"running": 3}


def test_expired_leases_requeue_and_results_commit_once(url):
    s = JobStore(url)
    job, _ = s.submit("generate", {})
    assert s.claim("w1", lease_s=0.05)["attempts"] == 1
    time.sleep(0.1)
    second = s.claim("w2", lease_s=30)
    assert second["id"] == job["id"] and second["attempts"] == 2
    assert s.heartbeat(job["id"], "w1") is None  # w1 lost its lease
    assert not s.complete(job["id"], "w1", {"files": ["stale"]})
    assert s.complete(job["id"], "w2", {"files": ["good"]})
    assert not s.complete(job["id"], "w2", {"files": ["twice"]})
    done = s.get(job["id"])
    assert done["status"] == "succeeded" and done["result"] == {"files": ["good"]} and done["progress"] == 1.0


def test_cancel_queued_and_running(url):
    s = JobStore(url)
    q, _ = s.submit("generate", {})
    assert s.cancel(q["id"])["status"] == "canceled"
    r, _ = s.submit("generate", {})
    s.claim("w1")
    assert s.cancel(r["id"])["status"] == "running"
    assert s.heartbeat(r["id"], "w1", progress=0.5)["cancel_requested"]
    assert s.canceled(r["id"], "w1") and s.get(r["id"])["status"] == "canceled"
    assert s.claim("w1") is None  # a canceled job never runs


def test_per_user_limit(url):
    s = JobStore(url, user_limit=2)
    s.submit("generate", {}, user="ann")
    s.submit("generate", {}, user="ann")
    with pytest.raises(QueueFull, match="limit 2"):
        s.submit("generate", {}, user="ann")
    s.submit("generate", {}, user="bob")
    jobs, total = s.list(user="ann")
    assert total == 2 and all(j["user"] == "ann" for j in jobs)


def test_a_worker_killed_with_sigkill_loses_its_job_to_the_next(url, tmp_path):
    s = JobStore(url)
    job, _ = s.submit("generate", {"prompt": "x"})
    code = textwrap.dedent(f"""
        import sys, time
        from imagesmith.serve.store import JobStore
        s = JobStore({url!r})
        j = s.claim("doomed", lease_s=4.0)
        print(j["id"], flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == job["id"]
        assert s.get(job["id"])["status"] == "running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert s.claim("next") is None  # the dead worker's lease is still held (4 s from its claim)
        end = time.time() + 30
        while (again := s.claim("next")) is None and time.time() < end:  # then it runs out: the job is requeued
            time.sleep(0.1)
        assert again["id"] == job["id"] and again["attempts"] == 2
        assert s.complete(job["id"], "next", {"ok": True})
    finally:
        if proc.poll() is None:
            proc.kill()


def test_schema_comes_from_migrations_and_matches_the_models(url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from imagesmith.serve.store import Base, migrate
    s = JobStore(url)
    with s.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert ctx.get_current_revision() == HEAD
        assert compare_metadata(ctx, Base.metadata) == []  # no model change without a migration
    assert migrate(s.engine) == HEAD  # idempotent


def test_a_database_made_before_migrations_is_stamped(tmp_path):
    from sqlalchemy import create_engine, inspect

    from imagesmith.serve.store import Base
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    Base.metadata.create_all(old)
    old.dispose()
    s = JobStore(url)
    job, _ = s.submit("generate", {"prompt": "x"})
    assert s.get(job["id"])["status"] == "queued"
    assert "alembic_version" in inspect(s.engine).get_table_names()


def _alembic(engine, revision: str) -> None:
    """Run the store's migrations up to ``revision`` only (a database as an older imagesmith left it)."""
    from alembic import command
    from alembic.config import Config

    from imagesmith.serve.store import MIGRATIONS
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def test_upgrade_from_the_previous_head_keeps_jobs_and_adds_uploads_and_batch_keys(url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, inspect, text

    from imagesmith.serve.store import Base
    old = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    _alembic(old, "0001")
    with old.begin() as conn:
        assert not inspect(conn).has_table("uploads")
        conn.execute(text('insert into jobs (id, type, "user", status, priority, request, progress, cancel_requested, '
                          "attempts, created_at) values ('11111111-2222-3333-4444-555555555555', 'generate', 'ann', "
                          "'queued', 0, '{\"prompt\": \"x\"}', 0, false, 0, 1.0)"))
    old.dispose()
    s = JobStore(url)  # the new version starts on the old database
    with s.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert ctx.get_current_revision() == HEAD and compare_metadata(ctx, Base.metadata) == []
    job = s.get("11111111-2222-3333-4444-555555555555", user="ann")
    assert job["request"] == {"prompt": "x"} and job["batch_key"] is None
    assert s.claim("w1")["id"] == job["id"]
    assert s.claim_compatible("w1", job, max_jobs=3, max_images=3) == []  # an old job has no key: runs alone
    s.add_upload("ab" * 16, user="ann", size=10, width=2, height=3)
    assert s.get_upload("ab" * 16, user="ann")["height"] == 3


def test_a_database_of_the_first_schema_made_before_migrations_is_stamped_and_upgraded(tmp_path):
    """A database as imagesmith made it before Alembic (the 0001 tables, no alembic_version) is stamped 0001 and
    then upgraded: the uploads table and jobs.batch_key are added, its jobs are kept."""
    from sqlalchemy import create_engine, inspect, text
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    _alembic(old, "0001")
    with old.begin() as conn:
        conn.execute(text("drop table alembic_version"))
        conn.execute(text('insert into jobs (id, type, "user", status, priority, request, progress, cancel_requested, '
                          "attempts, created_at) values ('j1', 'generate', 'local', 'queued', 0, '{}', 0, 0, 0, 1.0)"))
    old.dispose()
    s = JobStore(url)
    assert s.get("j1")["status"] == "queued"
    tables = inspect(s.engine).get_table_names()
    assert "uploads" in tables and "batch_key" in {c["name"] for c in inspect(s.engine).get_columns("jobs")}


def test_uploads_belong_to_their_user(url):
    s = JobStore(url)
    row = s.add_upload("0f" * 16, user="ann", size=1234, width=40, height=30)
    assert row["user"] == "ann" and row["size"] == 1234 and (row["width"], row["height"]) == (40, 30)
    assert row["created_at"] <= time.time()
    assert s.get_upload("0f" * 16, user="ann")["id"] == "0f" * 16
    assert s.get_upload("0f" * 16)["user"] == "ann"  # no user: an admin's view
    with pytest.raises(NotFound):
        s.get_upload("0f" * 16, user="bob")
    with pytest.raises(NotFound):
        s.get_upload("1f" * 16)


def test_compatible_jobs_are_claimed_together_in_priority_order(url):
    s = JobStore(url)
    head, _ = s.submit("generate", {"prompt": "a"}, batch_key="k1", priority=1)
    other, _ = s.submit("generate", {"prompt": "b"}, batch_key="k2", priority=1)   # another key
    low, _ = s.submit("generate", {"prompt": "c"}, batch_key="k1", priority=0)     # lower priority than head
    two, _ = s.submit("generate", {"prompt": "d", "batch_size": 2}, batch_key="k1", priority=1)
    urgent, _ = s.submit("generate", {"prompt": "e"}, batch_key="k1", priority=5)
    same, _ = s.submit("generate", {"prompt": "f"}, batch_key="k1", priority=1)
    keyless, _ = s.submit("generate", {"prompt": "g"}, priority=1)
    first = s.claim("w1")
    assert first["id"] == urgent["id"]  # the claim order is unchanged
    s.cancel(urgent["id"])
    s.canceled(urgent["id"], "w1")
    first = s.claim("w1")
    assert first["id"] == head["id"]
    # at most 2 more images: 'two' (2 images, the older) fills them and 'same' is left for now
    more = s.claim_compatible("w1", first, max_jobs=3, max_images=2, lease_s=30)
    assert [j["id"] for j in more] == [two["id"]]
    assert all(j["status"] == "running" and j["worker"] == "w1" and j["attempts"] == 1 for j in more)
    more = s.claim_compatible("w1", first, max_jobs=3, max_images=1, lease_s=30)
    assert [j["id"] for j in more] == [same["id"]]
    assert s.claim_compatible("w1", first, max_jobs=3, max_images=3) == []  # 'low' never rides along
    assert {s.get(j["id"])["status"] for j in (other, low, keyless)} == {"queued"}
    assert s.claim_compatible("w1", s.get(keyless["id"]), max_jobs=3, max_images=3) == []


def test_every_member_of_a_batch_whose_lease_expires_is_requeued(url):
    s = JobStore(url)
    jobs = [s.submit("generate", {"prompt": p}, batch_key="k")[0] for p in "abc"]
    head = s.claim("w1", lease_s=0.05)
    batch = [head] + s.claim_compatible("w1", head, max_jobs=3, max_images=3, lease_s=0.05)
    assert sorted(j["id"] for j in batch) == sorted(j["id"] for j in jobs)
    time.sleep(0.1)
    assert s.requeue_expired() == 3
    assert {s.get(j["id"])["status"] for j in jobs} == {"queued"}
    head = s.claim("w2", lease_s=30)
    again = [head] + s.claim_compatible("w2", head, max_jobs=3, max_images=3, lease_s=30)
    assert sorted(j["id"] for j in again) == sorted(j["id"] for j in jobs)
    assert all(j["attempts"] == 2 and j["worker"] == "w2" for j in again)
    for j in jobs:
        assert s.heartbeat(j["id"], "w1") is None and not s.complete(j["id"], "w1", {"files": ["stale"]})
        assert s.complete(j["id"], "w2", {"files": ["good"]})
    assert {s.get(j["id"])["result"]["files"][0] for j in jobs} == {"good"}


def test_a_paused_queue_is_claimed_from_by_no_one_and_the_pause_is_durable(url):
    s = JobStore(url)
    jobs = [s.submit("generate", {"prompt": p}, batch_key="k")[0] for p in "abc"]
    head = s.claim("w1")  # running before the pause: it finishes
    state = s.set_paused(True, by="ann", reason="new GPU driver")
    assert state["paused"] and state["changed_by"] == "ann" and state["reason"] == "new GPU driver"
    assert state["depth"] == {"queued": 2, "running": 1}
    assert s.claim_compatible("w1", head, max_jobs=3, max_images=3) == []  # the rest of a batch waits too
    late, _ = s.submit("generate", {"prompt": "d"})  # still accepted
    restarted = JobStore(url)  # a restarted server or another worker sees the same state
    assert restarted.queue_state()["paused"] and restarted.claim("w2") is None
    assert s.complete(head["id"], "w1", {"files": []})
    state = restarted.set_paused(False, by="ann")
    assert not state["paused"] and state["reason"] is None
    claimed = [restarted.claim("w2")["id"] for _ in range(3)]
    assert claimed == [jobs[1]["id"], jobs[2]["id"], late["id"]]


def test_export_and_import_keep_ids_priorities_places_and_owners(url, tmp_path):
    a = JobStore(url)
    low, _ = a.submit("generate", {"prompt": "low"}, user="ann", priority=-1)
    old, _ = a.submit("generate", {"prompt": "old"}, user="bob", idempotency_key="k1", callback_url="http://x/h")
    new, _ = a.submit("upscale", {"image": "x"}, user="ann", priority=5)
    plain, _ = a.submit("generate", {"prompt": "plain"}, user="ann")
    assert a.claim("w")["id"] == new["id"]  # running: exported too (it would run again elsewhere)
    running = new
    finished = a.claim("w")
    assert finished["id"] == old["id"] and a.complete(old["id"], "w", {"files": []})
    doc = a.export_queue()
    assert doc["format"] == "imagesmith-queue" and [j["id"] for j in doc["jobs"]] == [running["id"], plain["id"], low["id"]]
    assert [j["id"] for j in a.export_queue(user="bob")["jobs"]] == []
    b = JobStore(f"sqlite:///{tmp_path / 'other.db'}")  # another server
    out = b.import_queue(doc)
    assert sorted(out["imported"]) == sorted(j["id"] for j in doc["jobs"]) and out["existing"] == []
    copy = {j["id"]: j for j in b.list(limit=10)[0]}
    assert copy[low["id"]]["priority"] == -1 and copy[low["id"]]["user"] == "ann"
    assert all(j["status"] == "queued" and j["attempts"] == 0 for j in copy.values())
    assert [b.claim("w")["id"] for _ in range(3)] == [running["id"], plain["id"], low["id"]]  # same order
    assert b.import_queue(doc) == {"imported": [], "existing": [j["id"] for j in doc["jobs"]]}  # twice: no twins
    mine = JobStore(f"sqlite:///{tmp_path / 'third.db'}").import_queue(doc, user="carol")
    assert len(mine["imported"]) == 3


def test_a_bad_export_imports_nothing(url):
    s = JobStore(url)
    one = {"id": "a0", "type": "generate", "request": {}}
    for doc in ({"jobs": []}, {"format": "imagesmith-queue", "jobs": [{"id": "x/../y", "type": "generate",
                                                                        "request": {}}]}, [1, 2],
                {"format": "imagesmith-queue", "jobs": [dict(one, priority="high")]},
                {"format": "imagesmith-queue", "jobs": [dict(one, priority=1000)]},
                {"format": "imagesmith-queue", "jobs": [dict(one, callback_url=5)]},
                {"format": "imagesmith-queue", "jobs": [dict(one, user="a/b")]},
                {"format": "imagesmith-queue", "jobs": [dict(one, user="x" * 65)]},
                {"format": "imagesmith-queue", "jobs": [dict(one, idempotency_key="k" * 256)]}):
        with pytest.raises(BadRequest):
            s.import_queue(doc)
    good = {"id": "a1", "type": "generate", "request": {"prompt": "ok"}}
    bad = {"id": "a2", "type": "generate", "request": {"prompt": "no"}}

    def prepare(job):
        if job["request"]["prompt"] == "no":
            raise BadRequest("refused")
        return job
    too_long = dict(bad, request={"prompt": "ok"}, idempotency_key="k" * 300)
    with pytest.raises(BadRequest, match=r"jobs\[1\]: idempotency_key is longer"):
        s.import_queue({"format": "imagesmith-queue", "jobs": [good, too_long]})
    with pytest.raises(BadRequest, match=r"jobs\[1\] \(a2\): refused"):
        s.import_queue({"format": "imagesmith-queue", "jobs": [good, bad]}, prepare=prepare)
    assert s.depth() == {}  # the good one was not submitted either


def test_a_poison_job_that_kills_its_worker_fails_after_max_attempts_and_the_queue_moves_on(url):
    """Each worker process claims the job and dies by SIGKILL (an OOM kill, a native crash); after max_attempts
    lost workers the job ends failed with the reason and the next worker gets the job behind it."""
    s = JobStore(url, max_attempts=3)
    poison, _ = s.submit("generate", {"prompt": "crash"}, priority=5)
    behind, _ = s.submit("generate", {"prompt": "fine"})
    code = textwrap.dedent(f"""
        import os, signal
        from imagesmith.serve.store import JobStore
        j = JobStore({url!r}, max_attempts=3).claim("w%d" % os.getpid(), lease_s=0.3)
        print(j["id"], flush=True)
        if j["request"]["prompt"] == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    claimed = []
    for _ in range(4):
        time.sleep(0.4)  # the dead worker's lease runs out
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        claimed.append((proc.stdout.strip(), proc.returncode))
    assert claimed[:3] == [(poison["id"], -signal.SIGKILL)] * 3
    assert claimed[3] == (behind["id"], 0)  # the queue behind it moves
    dead = s.get(poison["id"])
    assert dead["status"] == "failed" and dead["attempts"] == 3 and "worker lost 3 times" in dead["error"]
    assert s.claim("w9") is None  # never claimed again
    again = s.requeue(poison["id"])  # an admin gives it another round
    assert again["status"] == "queued" and again["attempts"] == 0 and again["error"] is None
    with pytest.raises(NotFound):
        s.requeue("nope")
    from imagesmith.core.errors import Conflict
    with pytest.raises(Conflict, match="queued"):
        s.requeue(poison["id"])
    with pytest.raises(ValueError):
        JobStore(url, max_attempts=0)


def test_processes_starting_together_on_a_fresh_database_all_come_up(tmp_path):
    """`serve` and `worker` started at once on a new SQLite file used to race in the migrations (the loser died
    with 'table alembic_version already exists'); they take turns now."""
    import subprocess
    import sys
    import time
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    start = time.time() + 2.0
    code = ("import sys, time; from imagesmith.serve.store import JobStore, migrate; "
            f"time.sleep(max(0, {start} - time.time())); s = JobStore({url!r}); print(migrate(s.engine))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-400:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
