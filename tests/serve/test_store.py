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

from imagesmith.core.errors import NotFound
from imagesmith.serve.store import JobStore, QueueFull


PG = os.environ.get("IMAGESMITH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_schema():
    """A fresh schema in the local PostgreSQL (the service the machine runs), or None when it is not up."""
    import uuid
    try:
        import psycopg
        conn = psycopg.connect(PG.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3, autocommit=True)
    except Exception:  # noqa: BLE001
        return None, None
    schema = "t_" + uuid.uuid4().hex[:12]
    conn.execute(f"create schema {schema}")
    return conn, schema


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    conn, schema = _postgres_schema()
    if conn is None:
        pytest.skip("PostgreSQL is not running on loopback")
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        conn.execute(f"drop schema {schema} cascade")
        conn.close()


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
        j = s.claim("doomed", lease_s=1.0)
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
        assert s.claim("next") is None  # the lease is still held for up to a second
        time.sleep(1.1)
        again = s.claim("next")
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
        assert ctx.get_current_revision() == "0001"
        assert compare_metadata(ctx, Base.metadata) == []  # no model change without a migration
    assert migrate(s.engine) == "0001"  # idempotent


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
