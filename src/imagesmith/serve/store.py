"""The durable job store behind the service: SQLAlchemy over embedded SQLite (WAL) by default, PostgreSQL when
``IMAGESMITH_DATABASE_URL`` says so.

Queue semantics:

- a job is committed before its id is returned (``submit``); an ``Idempotency-Key`` per user returns the first
  job again instead of queueing a twin;
- a worker claims a job with a lease (``claim``): a conditional UPDATE from ``queued`` to ``running`` that only
  one claimant can win, on SQLite and PostgreSQL alike, preferring jobs for the models it has loaded, then
  priority, then age; it keeps the lease with ``heartbeat``;
- a lease that expires (the worker died, even by kill -9) puts the job back in the queue at the next claim;
- ``complete``/``fail`` only count from the worker holding the lease, once: a job's result is committed once;
- ``cancel``: a queued job is canceled at once, a running one at its next step (the worker sees
  ``cancel_requested`` in its heartbeat);
- per-user limits on queued + running jobs;
- batching: jobs whose ``batch_key`` is equal (txt2img requests that differ only in prompt, negative prompt,
  seed and batch size; :func:`~imagesmith.serve.worker.batch_key`) may be claimed together
  (``claim_compatible``), each with its own lease, heartbeat, cancel and result;
- uploads have owners (``add_upload``/``get_upload``): another user's upload is not found;
- the queue can be paused (``set_paused``): nothing is claimed, submissions still wait, running jobs finish;
  its unfinished jobs export to a JSON document (``export_queue``) that ``import_queue`` submits again, here or
  on another server, each job keeping its id, priority and place.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (JSON, Boolean, Float, Index, Integer, LargeBinary, String, Text, UniqueConstraint, case,
                        create_engine, delete, event, func, select, update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ..core.errors import BadRequest, Conflict, NotFound, TooManyRequests

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")


class QueueFull(TooManyRequests):
    code = "queue_full"


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    user: Mapped[str] = mapped_column(String(64), default="local")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request: Mapped[dict] = mapped_column(JSON)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_note: Mapped[str | None] = mapped_column(String(255), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    batch_key: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (UniqueConstraint("user", "idempotency_key", name="uq_jobs_user_idempotency"),
                      Index("ix_jobs_queue", "status", "priority", "created_at"),
                      Index("ix_jobs_user", "user", "created_at"),
                      Index("ix_jobs_batch", "batch_key", "status"))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "user": self.user, "status": self.status,
                "priority": self.priority, "model": self.model, "request": self.request, "result": self.result,
                "error": self.error, "progress": self.progress, "progress_note": self.progress_note,
                "attempts": self.attempts, "cancel_requested": self.cancel_requested, "worker": self.lease_owner,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
                "batch_key": self.batch_key}


class UserRow(Base):
    __tablename__ = "users"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), default="user")
    created_at: Mapped[float] = mapped_column(Float)


class TokenRow(Base):
    """API tokens, stored as their SHA-256 (tokens are 256-bit random: a slow hash adds nothing)."""
    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class UploadRow(Base):
    """An uploaded image (the PNG is ``<home>/uploads/<id>.png``) and the user who owns it."""
    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_uploads_user", "user", "created_at"),)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "size": self.size, "width": self.width, "height": self.height,
                "created_at": self.created_at}


class A1111OptionsRow(Base):
    """A user's A1111 options (``POST /sdapi/v1/options``): their defaults for later requests."""
    __tablename__ = "a1111_options"
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    options: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float)


class OutputBlobRow(Base):
    """A job's output file kept in the database (``IMAGESMITH_OUTPUT_STORE=database``): any API node connected to
    the same PostgreSQL serves it, wherever the worker that made it ran."""
    __tablename__ = "output_blobs"
    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36))
    user: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_output_blobs_job", "job_id"),)


class QueueStateRow(Base):
    """Whether workers may claim jobs (``paused``: jobs are still accepted and wait; running ones finish)."""
    __tablename__ = "queue_state"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    changed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


QUEUE = "default"
EXPORT_FORMAT = "imagesmith-queue"
EXPORT_FIELDS = ("id", "type", "user", "status", "priority", "model", "request", "idempotency_key", "callback_url",
                 "batch_key", "created_at")
"""What a queue export keeps of each unfinished job: enough to submit it again, here or on another server."""


def _check_user_name(name: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise BadRequest("user names are 1-64 letters, digits, '-', '_' or '.'")


def _check_lengths(**values: str | None) -> None:
    """What the columns hold at most (PostgreSQL refuses longer values with an error, SQLite keeps them)."""
    most = {"idempotency_key": 255, "model": 255, "batch_key": 64, "user": 64}
    for field, value in values.items():
        if value is not None and len(value) > most[field]:
            raise BadRequest(f"{field} is longer than {most[field]} characters")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


MIGRATIONS = __import__("pathlib").Path(__file__).resolve().parent / "migrations"


def migrate(engine, *, attempts: int = 20) -> str:
    """Bring the database to the newest schema with Alembic (``serve/migrations``); a database made before
    migrations existed (tables, no ``alembic_version``) is stamped. Returns the revision.

    Processes that start together on a fresh database (``serve`` and ``worker``) take turns: on PostgreSQL an
    advisory lock held for the migration's transaction; on SQLite (whose DDL pysqlite commits statement by
    statement) an exclusive lock on a file beside the database."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import DBAPIError
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    for attempt in range(attempts):
        try:
            with _sqlite_migration_lock(engine), engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(7274631)"))  # 'imagesmith migrate'
                cfg.attributes["connection"] = conn
                current = MigrationContext.configure(conn).get_current_revision()
                if current is None and inspect(conn).has_table("jobs"):
                    command.stamp(cfg, "0001")
                command.upgrade(cfg, "head")
                return MigrationContext.configure(conn).get_current_revision()
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 + 0.1 * attempt)  # another process is migrating: let it finish
    raise AssertionError("unreachable")


@contextmanager
def _sqlite_migration_lock(engine):
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one process per database there
        yield
        return
    with open(f"{path}.migrate.lock", "a") as fp:
        fcntl.flock(fp, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fp, fcntl.LOCK_UN)


class JobStore:
    """``JobStore(url)``: ``sqlite:///path/jobs.db`` (WAL) or ``postgresql+psycopg://...``."""

    def __init__(self, url: str, *, user_limit: int = 100, max_attempts: int | None = None):
        if url.startswith(("postgresql://", "postgres://")):  # the driver imagesmith installs: psycopg 3
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.user_limit = user_limit
        # a job whose worker dies this many times (OOM kill, segfault) fails instead of killing workers forever
        self.max_attempts = int(max_attempts if max_attempts is not None
                                else os.environ.get("IMAGESMITH_MAX_ATTEMPTS", "3"))
        if self.max_attempts < 1:
            raise ValueError("max_attempts (IMAGESMITH_MAX_ATTEMPTS) must be at least 1")

    # ---------------------------------------------------------------- clients
    def submit(self, type: str, request: dict, *, user: str = "local", priority: int = 0,
               idempotency_key: str | None = None, model: str | None = None,
               callback_url: str | None = None, batch_key: str | None = None, job_id: str | None = None,
               created_at: float | None = None) -> tuple[dict, bool]:
        """(job, created): the job is committed before this returns; a repeated idempotency key gives the
        first job and ``created`` False. ``batch_key``: jobs with equal keys may run in one pipeline call.
        ``job_id`` and ``created_at`` re-submit an exported job as it was (its place in the queue kept); a job with
        that id already here is returned with ``created`` False."""
        _check_lengths(idempotency_key=idempotency_key, model=model, batch_key=batch_key, user=user)
        with self.sessions() as s:
            if job_id is not None and (old := s.get(JobRow, job_id)) is not None:
                return old.to_dict(), False
            if idempotency_key:
                old = s.scalar(select(JobRow).where(JobRow.user == user, JobRow.idempotency_key == idempotency_key))
                if old is not None:
                    return old.to_dict(), False
            active = s.scalar(select(func.count()).select_from(JobRow).where(
                JobRow.user == user, JobRow.status.in_(("queued", "running"))))
            if active >= self.user_limit:
                raise QueueFull(f"user {user!r} already has {active} jobs queued or running (limit {self.user_limit})")
            row = JobRow(id=job_id or str(uuid.uuid4()), type=type, user=user, status="queued",
                         priority=int(priority), model=model, request=request, idempotency_key=idempotency_key,
                         callback_url=callback_url, created_at=time.time() if created_at is None else created_at,
                         progress=0.0, attempts=0, cancel_requested=False, batch_key=batch_key)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:  # the same key (or id) raced in from another request: return that one
                s.rollback()
                old = s.get(JobRow, job_id) if job_id is not None else None
                old = old or s.scalar(select(JobRow).where(JobRow.user == user,
                                                           JobRow.idempotency_key == idempotency_key))
                return old.to_dict(), False
            return row.to_dict(), True

    def _owned(self, table, key: str, user: str | None, what: str) -> dict:
        """The row ``key`` of ``table`` as a dict; NotFound when there is none or (``user`` given) it is
        someone else's: another user's job or upload is not told apart from a missing one."""
        with self.sessions() as s:
            row = s.get(table, key)
            if row is None or (user is not None and row.user != user):
                raise NotFound(f"no {what} {key}")
            return row.to_dict()

    def get(self, job_id: str, *, user: str | None = None) -> dict:
        return self._owned(JobRow, job_id, user, "job")

    def list(self, *, user: str | None = None, status: str | None = None, limit: int = 50,
             offset: int = 0, job_type: str | None = None) -> tuple[list[dict], int]:
        with self.sessions() as s:
            q = select(JobRow)
            if user is not None:
                q = q.where(JobRow.user == user)
            if status is not None:
                q = q.where(JobRow.status == status)
            if job_type is not None:
                q = q.where(JobRow.type == job_type)
            return _page(s, q, JobRow.created_at.desc(), limit, offset)

    def callback_of(self, job_id: str) -> str | None:
        with self.sessions() as s:
            row = s.get(JobRow, job_id)
            return row.callback_url if row is not None else None

    def cancel(self, job_id: str, *, user: str | None = None) -> dict:
        """Queued: canceled now. Running: canceled at its next step. Finished: unchanged."""
        job = self.get(job_id, user=user)
        now = time.time()
        with self.sessions() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                      .values(status="canceled", finished_at=now, cancel_requested=True))
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "running")
                      .values(cancel_requested=True))
            s.commit()
        return self.get(job["id"])

    def depth(self) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
        return {status: int(n) for status, n in rows}

    # ---------------------------------------------------------------- uploads
    def add_upload(self, upload_id: str, *, user: str, size: int, width: int, height: int) -> dict:
        """Record an upload (its file is already written) as ``user``'s."""
        with self.sessions() as s:
            row = UploadRow(id=upload_id, user=user, size=int(size), width=int(width), height=int(height),
                            created_at=time.time())
            s.add(row)
            s.commit()
            return row.to_dict()

    def list_uploads(self, *, user: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
        """``user``'s uploads (everyone's for None), newest first, and how many there are."""
        with self.sessions() as s:
            q = select(UploadRow)
            if user is not None:
                q = q.where(UploadRow.user == user)
            return _page(s, q, UploadRow.created_at.desc(), limit, offset)

    def get_upload(self, upload_id: str, *, user: str | None = None) -> dict:
        """The upload's record; NotFound when there is none or (``user`` given) it is someone else's."""
        return self._owned(UploadRow, upload_id, user, "upload")

    # ---------------------------------------------------------------- retention
    def finished_jobs(self, *, user: str | None = None) -> list[dict]:
        """Finished jobs (succeeded, failed, canceled), oldest finish first: what a retention policy may delete."""
        with self.sessions() as s:
            q = select(JobRow).where(JobRow.status.in_(("succeeded", "failed", "canceled")))
            if user is not None:
                q = q.where(JobRow.user == user)
            return [r.to_dict() for r in s.scalars(q.order_by(JobRow.finished_at, JobRow.created_at))]

    def unfinished_requests(self) -> list[dict]:
        """The requests of queued and running jobs (their upload files must stay)."""
        with self.sessions() as s:
            return list(s.scalars(select(JobRow.request).where(JobRow.status.in_(("queued", "running")))))

    def all_uploads(self, *, user: str | None = None) -> list[dict]:
        """Every upload (``user``'s), oldest first."""
        with self.sessions() as s:
            q = select(UploadRow)
            if user is not None:
                q = q.where(UploadRow.user == user)
            return [r.to_dict() for r in s.scalars(q.order_by(UploadRow.created_at))]

    def delete_finished(self, job_ids: list[str]) -> int:
        """Delete these jobs' rows, if they are still finished (a requeued job is kept). Returns how many."""
        if not job_ids:
            return 0
        with self.sessions() as s:
            gone = list(s.scalars(select(JobRow.id).where(JobRow.id.in_(job_ids),
                                                          JobRow.status.in_(("succeeded", "failed", "canceled")))))
            s.execute(delete(JobRow).where(JobRow.id.in_(gone)))
            s.execute(delete(OutputBlobRow).where(OutputBlobRow.job_id.in_(gone)))  # their stored outputs too
            s.commit()
            return len(gone)

    # ---------------------------------------------------------------- output blobs (serve.storage)
    def put_blob(self, blob_id: str, *, job_id: str, user: str, name: str, data: bytes) -> None:
        with self.sessions() as s:
            s.merge(OutputBlobRow(id=blob_id, job_id=job_id, user=user, name=name, size=len(data), data=data,
                                  created_at=time.time()))
            s.commit()

    def get_blob(self, blob_id: str) -> bytes:
        with self.sessions() as s:
            data = s.scalar(select(OutputBlobRow.data).where(OutputBlobRow.id == blob_id))
        if data is None:
            raise NotFound(f"no stored output {blob_id}")
        return bytes(data)

    def delete_blobs(self, blob_ids: list[str]) -> int:
        if not blob_ids:
            return 0
        with self.sessions() as s:
            n = s.execute(delete(OutputBlobRow).where(OutputBlobRow.id.in_(blob_ids))).rowcount
            s.commit()
            return int(n or 0)

    def blob_bytes_by_user(self) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(select(OutputBlobRow.user, func.sum(OutputBlobRow.size)).group_by(OutputBlobRow.user))
            return {user: int(n or 0) for user, n in rows}

    def delete_uploads(self, upload_ids: list[str]) -> int:
        if not upload_ids:
            return 0
        with self.sessions() as s:
            n = s.execute(delete(UploadRow).where(UploadRow.id.in_(upload_ids))).rowcount
            s.commit()
            return int(n or 0)

    # ---------------------------------------------------------------- users and tokens
    def add_user(self, name: str, role: str = "user") -> dict:
        _check_user_name(name)
        if role not in ("user", "admin"):
            raise BadRequest("role is 'user' or 'admin'")
        with self.sessions() as s:
            if s.get(UserRow, name) is not None:
                raise BadRequest(f"user {name!r} exists")
            s.add(UserRow(name=name, role=role, created_at=time.time()))
            s.commit()
        return {"name": name, "role": role}

    def create_token(self, user: str) -> str:
        """A new token for ``user``; only its hash is stored, so this is the one time it is seen."""
        with self.sessions() as s:
            if s.get(UserRow, user) is None:
                raise NotFound(f"no user {user!r} (imagesmith users add {user})")
            token = "ism_" + secrets.token_urlsafe(32)
            s.add(TokenRow(id=secrets.token_hex(8), user=user, digest=token_digest(token), created_at=time.time(),
                           revoked=False))
            s.commit()
            return token

    def user_for_token(self, token: str) -> dict | None:
        """``{name, role}`` of a valid token's user, else None."""
        with self.sessions() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.digest == token_digest(token), TokenRow.revoked.is_(False)))
            if row is None:
                return None
            user = s.get(UserRow, row.user)
            return {"name": user.name, "role": user.role} if user is not None else None

    # ---------------------------------------------------------------- the queue as a whole
    def queue_state(self) -> dict[str, Any]:
        """``{paused, changed_at, changed_by, reason, depth}``."""
        with self.sessions() as s:
            row = s.get(QueueStateRow, QUEUE)
            state = {"paused": bool(row and row.paused), "changed_at": row and row.changed_at,
                     "changed_by": row and row.changed_by, "reason": row and row.reason}
        return {**state, "depth": self.depth()}

    def a1111_options(self, user: str) -> dict[str, Any]:
        """The A1111 options ``user`` has set (empty when none)."""
        with self.sessions() as s:
            row = s.get(A1111OptionsRow, user)
            return dict(row.options) if row is not None else {}

    def set_a1111_options(self, user: str, updates: dict[str, Any]) -> dict[str, Any]:
        """Merge ``updates`` into ``user``'s A1111 options (durable; other users' are untouched); the result."""
        with self.sessions() as s:
            row = s.get(A1111OptionsRow, user) or A1111OptionsRow(user=user, options={})
            row.options = {**(row.options or {}), **updates}
            row.updated_at = time.time()
            s.add(row)
            s.commit()
            return dict(row.options)

    SERVER_RECORD = "*server*"  # not a valid user name: the server-wide record in the options table

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"state": "loaded" | "unloaded", "changed_at": float | None, "by": str | None}``: what an admin last asked
        of every worker's checkpoints (A1111's unload-checkpoint / reload-checkpoint). Durable."""
        rec = self.a1111_options(self.SERVER_RECORD).get("checkpoints") or {}
        return {"state": rec.get("state", "loaded"), "changed_at": rec.get("changed_at"), "by": rec.get("by")}

    def set_checkpoint_state(self, state: str, *, by: str = "local") -> dict[str, Any]:
        if state not in ("loaded", "unloaded"):
            raise ValueError(state)
        self.set_a1111_options(self.SERVER_RECORD, {"checkpoints": {"state": state, "changed_at": time.time(),
                                                                     "by": by}})
        return self.checkpoint_state()

    def set_paused(self, paused: bool, *, by: str = "local", reason: str | None = None) -> dict[str, Any]:
        """Pause (workers claim nothing; submissions are still accepted and wait; running jobs finish) or
        resume the queue. Durable: a restarted server or worker keeps the state."""
        with self.sessions() as s:
            row = s.get(QueueStateRow, QUEUE) or QueueStateRow(name=QUEUE)
            row.paused, row.changed_at, row.changed_by = paused, time.time(), by
            row.reason = reason if paused else None
            s.add(row)
            s.commit()
        return self.queue_state()

    @staticmethod
    def _paused(session) -> bool:
        return bool(session.scalar(select(QueueStateRow.paused).where(QueueStateRow.name == QUEUE)))

    def export_queue(self, *, user: str | None = None) -> dict[str, Any]:
        """The unfinished jobs (queued, and running ones, which would run again elsewhere) of ``user`` (None:
        everyone's), in claim order, as a JSON-able document :meth:`import_queue` takes back."""
        with self.sessions() as s:
            q = select(JobRow).where(JobRow.status.in_(("queued", "running")))
            if user is not None:
                q = q.where(JobRow.user == user)
            rows = s.scalars(q.order_by(JobRow.priority.desc(), JobRow.created_at.asc())).all()
            jobs = [{k: v for k, v in r.to_dict().items() if k in EXPORT_FIELDS} for r in rows]
        return {"format": EXPORT_FORMAT, "version": 1, "exported_at": time.time(), "jobs": jobs}

    def import_queue(self, doc: Any, *, user: str | None = None,
                     prepare: Callable[[dict], dict] | None = None) -> dict[str, list[str]]:
        """Submit the jobs of an :meth:`export_queue` document again, each with its id, priority and age (so
        they keep their places). ``user``: every job becomes this user's (None keeps each job's owner: an admin's
        import). ``prepare(job) -> job`` may check and normalise each job first (the service re-validates the
        request, uploads and safety); every job is checked before any is submitted, so a bad document imports
        nothing. Returns ``{"imported": ids, "existing": ids}`` (ids already here are left as they are)."""
        if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT or not isinstance(doc.get("jobs"), list):
            raise BadRequest(f"not a queue export: expected {{'format': '{EXPORT_FORMAT}', 'jobs': [...]}}")
        jobs = []
        for k, job in enumerate(doc["jobs"]):
            if not isinstance(job, dict) or not isinstance(job.get("type"), str) \
                    or not isinstance(job.get("request"), dict) or not isinstance(job.get("id"), str) \
                    or not re.fullmatch(r"[\w-]{1,36}", job["id"]):
                raise BadRequest(f"jobs[{k}]: needs an id (up to 36 letters, digits, '-' or '_'), a type and a request")
            kinds = {"priority": int, "created_at": (int, float), "user": str, "model": str, "callback_url": str,
                     "idempotency_key": str, "batch_key": str}
            for field, kind in kinds.items():
                value = job.get(field)
                if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                    raise BadRequest(f"jobs[{k}].{field}: wrong type {type(value).__name__}")
            if not -100 <= int(job.get("priority") or 0) <= 100:
                raise BadRequest(f"jobs[{k}].priority must be between -100 and 100")
            job = {**job, "user": user or str(job.get("user") or "local")}
            try:
                _check_user_name(job["user"])
                _check_lengths(**{f: job.get(f) for f in ("idempotency_key", "model", "batch_key", "user")})
            except BadRequest as exc:
                raise BadRequest(f"jobs[{k}]: {exc}") from None
            try:
                jobs.append(prepare(job) if prepare else job)
            except BadRequest as exc:
                raise BadRequest(f"jobs[{k}] ({job['id']}): {exc}") from None
        out: dict[str, list[str]] = {"imported": [], "existing": []}
        for job in jobs:
            created_at = job.get("created_at")
            row, created = self.submit(
                job["type"], job["request"], user=job["user"], priority=int(job.get("priority") or 0),
                idempotency_key=job.get("idempotency_key"), model=job.get("model"),
                callback_url=job.get("callback_url"), batch_key=job.get("batch_key"), job_id=job["id"],
                created_at=float(created_at) if isinstance(created_at, (int, float)) else None)
            out["imported" if created else "existing"].append(row["id"])
        return out

    # ---------------------------------------------------------------- workers
    def requeue_expired(self, now: float | None = None) -> int:
        """Jobs whose worker stopped renewing its lease go back to the queue (or to canceled, if asked); a job
        whose workers were lost `max_attempts` times ends failed, never to be claimed again (a poison job:
        ``requeue`` gives it another round)."""
        now = time.time() if now is None else now
        with self.sessions() as s:
            s.execute(update(JobRow).where(JobRow.status == "running", JobRow.lease_expires < now,
                                           JobRow.cancel_requested.is_(True))
                      .values(status="canceled", lease_owner=None, finished_at=now))
            s.execute(update(JobRow).where(JobRow.status == "running", JobRow.lease_expires < now,
                                           JobRow.attempts >= self.max_attempts)
                      .values(status="failed", lease_owner=None, lease_expires=None, finished_at=now,
                              error=f"worker lost {self.max_attempts} times (IMAGESMITH_MAX_ATTEMPTS="
                                    f"{self.max_attempts}): the job may crash its worker; an admin can requeue it"))
            n = s.execute(update(JobRow).where(JobRow.status == "running", JobRow.lease_expires < now)
                          .values(status="queued", lease_owner=None, lease_expires=None)).rowcount
            s.commit()
            return int(n or 0)

    def claim(self, worker: str, *, lease_s: float = 30.0, loaded_models: tuple[str, ...] = (),
              types: tuple[str, ...] | None = None) -> dict | None:
        """The next job for ``worker`` (its models first, then priority, then age), leased for ``lease_s``."""
        self.requeue_expired()
        with self.sessions() as s:
            if self._paused(s):
                return None
            q = select(JobRow.id).where(JobRow.status == "queued")
            if types:
                q = q.where(JobRow.type.in_(types))
            affinity = case((JobRow.model.in_(loaded_models), 1), else_=0) if loaded_models else None
            order = ([affinity.desc()] if affinity is not None else []) + [JobRow.priority.desc(),
                                                                          JobRow.created_at.asc()]
            for job_id in s.scalars(q.order_by(*order).limit(8)).all():
                job = _try_claim(s, job_id, worker, lease_s)
                if job is not None:
                    return job
        return None

    def claim_compatible(self, worker: str, head: dict, *, max_jobs: int, max_images: int,
                         lease_s: float = 30.0) -> list[dict]:
        """More queued jobs to run in one pipeline call with ``head`` (a job this worker has just claimed): the
        same type and ``batch_key``, in priority then age order, none of lower priority than ``head`` (a batch
        never lets lower-priority work ahead), at most ``max_jobs`` jobs and ``max_images`` images in all. Each
        is claimed as ``claim`` does (one claimant, its own lease and attempt count)."""
        if not head.get("batch_key") or max_jobs < 1 or max_images < 1:
            return []
        claimed: list[dict] = []
        images = 0
        with self.sessions() as s:
            if self._paused(s):  # paused since the head was claimed: it runs alone, the rest wait
                return []
            q = (select(JobRow.id, JobRow.request).where(
                JobRow.status == "queued", JobRow.type == head["type"], JobRow.batch_key == head["batch_key"],
                JobRow.priority >= head["priority"], JobRow.id != head["id"])
                .order_by(JobRow.priority.desc(), JobRow.created_at.asc()).limit(4 * max_jobs))
            for job_id, request in s.execute(q).all():
                n = job_images(request)
                if images + n > max_images:
                    continue
                job = _try_claim(s, job_id, worker, lease_s)
                if job is not None:
                    claimed.append(job)
                    images += n
                    if len(claimed) >= max_jobs or images >= max_images:
                        break
        return claimed

    def release(self, job_id: str, worker: str) -> bool:
        """The lease holder hands a running job back to the queue at once (a graceful shutdown): queued again
        now rather than when the lease runs out, and the attempt does not count towards ``max_attempts``."""
        with self.sessions() as s:
            n = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == worker,
                                               JobRow.status == "running")
                          .values(status="queued", lease_owner=None, lease_expires=None, progress=0.0,
                                  progress_note="returned to the queue: its worker shut down",
                                  attempts=JobRow.attempts - 1)).rowcount
            s.commit()
            return n == 1

    def requeue(self, job_id: str) -> dict:
        """A failed or canceled job back to the queue with its attempts reset (admin: a poison job retried)."""
        with self.sessions() as s:
            n = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(("failed", "canceled")))
                          .values(status="queued", attempts=0, error=None, lease_owner=None, lease_expires=None,
                                  finished_at=None, cancel_requested=False, progress=0.0)).rowcount
            s.commit()
            row = s.get(JobRow, job_id, populate_existing=True)
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        if n != 1:
            raise Conflict(f"job {job_id} is {row.status}: only failed or canceled jobs can be requeued")
        return row.to_dict()

    def heartbeat(self, job_id: str, worker: str, *, lease_s: float = 30.0, progress: float | None = None,
                  note: str | None = None) -> dict | None:
        """Renew the lease (and record progress); None when the lease is lost (another worker has the job)."""
        values: dict[str, Any] = {"lease_expires": time.time() + lease_s}
        if progress is not None:
            values["progress"] = float(progress)
        if note is not None:
            values["progress_note"] = note[:255]
        with self.sessions() as s:
            n = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == worker,
                                               JobRow.status == "running").values(**values)).rowcount
            s.commit()
            return s.get(JobRow, job_id, populate_existing=True).to_dict() if n == 1 else None

    def _finish(self, job_id: str, worker: str, **values: Any) -> bool:
        with self.sessions() as s:
            n = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == worker,
                                               JobRow.status == "running")
                          .values(finished_at=time.time(), lease_expires=None, **values)).rowcount
            s.commit()
            return n == 1

    def complete(self, job_id: str, worker: str, result: dict) -> bool:
        """True once: only the lease holder of a running job commits its result."""
        return self._finish(job_id, worker, status="succeeded", result=result, progress=1.0)

    def forget_outputs(self, job_id: str, note: str) -> dict:
        """A finished job's result without its files (A1111's ``save_images: false``): the row stays, for history
        and accounting, its file entries and database copies go; ``note`` says why. Returns the new result."""
        with self.sessions() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job {job_id}")
            result = dict(row.result or {})
            files = result.get("files") or []
            blobs = [f["blob"] for f in files if f.get("blob")]
            result.update(files=[], files_not_kept=len(files), note=note)
            s.execute(update(JobRow).where(JobRow.id == job_id).values(result=result))
            if blobs:
                s.execute(delete(OutputBlobRow).where(OutputBlobRow.id.in_(blobs)))
            s.commit()
            return result

    def fail(self, job_id: str, worker: str, error: str) -> bool:
        return self._finish(job_id, worker, status="failed", error=error)

    def canceled(self, job_id: str, worker: str) -> bool:
        return self._finish(job_id, worker, status="canceled", error="canceled")


def _try_claim(session, job_id: str, worker: str, lease_s: float) -> dict | None:
    """Take one queued job with a conditional UPDATE (exactly one claimant wins, even across processes), with
    a fresh lease and one more attempt; the job as a dict, or None when another worker got it first."""
    now = time.time()
    won = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued").values(
        status="running", lease_owner=worker, lease_expires=now + lease_s, started_at=now,
        attempts=JobRow.attempts + 1, progress=0.0)).rowcount
    session.commit()
    return session.get(JobRow, job_id, populate_existing=True).to_dict() if won == 1 else None


def _page(session, query, order, limit: int, offset: int) -> tuple[list[dict], int]:
    """One page of ``query``'s rows (as dicts) in ``order``, and the count of all of them."""
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(order).limit(limit).offset(offset)).all()
    return [r.to_dict() for r in rows], int(total or 0)


def job_images(request: dict) -> int:
    """How many images a generate request makes (batch_size x batch_count)."""
    try:
        return max(1, int(request.get("batch_size") or 1)) * max(1, int(request.get("batch_count") or 1))
    except (TypeError, ValueError, AttributeError):
        return 1
