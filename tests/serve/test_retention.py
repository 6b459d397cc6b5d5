"""Retention and disk use: finished jobs' outputs and unused uploads go by age and by a per-user size cap, with
their rows; queued and running jobs and the uploads they will read stay; `imagesmith admin` shows and runs it."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import update

from fixtures.cli import run_cli
from imagesmith.core.errors import NotFound
from imagesmith.core.settings import Settings
from imagesmith.serve.retention import Policy, apply_retention, disk_use, job_dir, upload_file
from imagesmith.serve.store import JobRow, JobStore, UploadRow
from imagesmith.serve.worker import job_folder

DAY = 86400.0


@pytest.fixture()
def world(tmp_path):
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    store = JobStore(f"sqlite:///{settings.home / 'jobs.db'}")
    return settings, store


def finished(settings, store, user, kb, *, age_days, status="succeeded"):
    job, _ = store.submit("generate", {"prompt": "x"}, user=user)
    claimed = store.claim("w")
    assert claimed["id"] == job["id"]
    folder = job_folder(settings, claimed)
    folder.mkdir(parents=True)
    (folder / "00000-1.png").write_bytes(b"\0" * kb * 1024)
    (store.complete if status == "succeeded" else store.fail)(job["id"], "w", {"files": []} if status == "succeeded"
                                                               else "boom")
    with store.sessions() as s:
        s.execute(update(JobRow).where(JobRow.id == job["id"]).values(finished_at=time.time() - age_days * DAY))
        s.commit()
    return job["id"]


def upload(settings, store, user, kb, *, age_days):
    import uuid
    uid = uuid.uuid4().hex
    upload_file(settings, uid).parent.mkdir(parents=True, exist_ok=True)
    upload_file(settings, uid).write_bytes(b"\0" * kb * 1024)
    store.add_upload(uid, user=user, size=kb * 1024, width=8, height=8)
    with store.sessions() as s:
        s.execute(update(UploadRow).where(UploadRow.id == uid).values(created_at=time.time() - age_days * DAY))
        s.commit()
    return uid


def gone(store, job_id) -> bool:
    try:
        store.get(job_id)
        return False
    except NotFound:
        return True


def test_age_policy_deletes_old_finished_work_and_keeps_what_is_still_needed(world):
    settings, store = world
    old_ok = finished(settings, store, "ann", 10, age_days=40)
    old_failed = finished(settings, store, "ann", 5, age_days=31, status="failed")
    recent = finished(settings, store, "ann", 10, age_days=2)
    old_upload = upload(settings, store, "ann", 20, age_days=60)
    needed = upload(settings, store, "ann", 20, age_days=60)
    queued, _ = store.submit("img2img", {"prompt": "y", "init_image": str(upload_file(settings, needed))}, user="ann")
    job = store.get(old_ok)
    assert job_folder(settings, {**job, "attempts": 1}).parent == job_dir(settings, job)
    report = apply_retention(settings, store, Policy.make(30, None), dry_run=True)
    assert {e["id"] for e in report["deleted_jobs"]} == {old_ok, old_failed}
    assert [e["id"] for e in report["deleted_uploads"]] == [old_upload]
    assert not gone(store, old_ok) and job_dir(settings, job).is_dir()  # a dry run deletes nothing
    report = apply_retention(settings, store, Policy.make(30, None))
    assert report["freed_bytes"] == (10 + 5 + 20) * 1024 and all(e["why"] == "age" for e in report["deleted_jobs"])
    assert gone(store, old_ok) and gone(store, old_failed) and not job_dir(settings, job).exists()
    assert not gone(store, recent) and job_dir(settings, store.get(recent)).is_dir()
    assert not upload_file(settings, old_upload).exists() and upload_file(settings, needed).exists()
    assert store.get(queued["id"])["status"] == "queued"
    assert [u["id"] for u in store.all_uploads()] == [needed]


def test_size_cap_deletes_a_users_oldest_first_and_leaves_others_alone(world):
    settings, store = world
    ids = [finished(settings, store, "ann", 100, age_days=d) for d in (5, 4, 3, 2, 1)]
    bob = [finished(settings, store, "bob", 300, age_days=9)]
    use = disk_use(settings, store)["users"]
    assert use["ann"]["outputs_bytes"] == 500 * 1024 and use["ann"]["jobs"] == 5 and use["bob"]["jobs"] == 1
    report = apply_retention(settings, store, Policy(max_bytes_per_user=250 * 1024))
    by_user = lambda u: [e["id"] for e in report["deleted_jobs"] if e["user"] == u]  # noqa: E731
    assert by_user("ann") == ids[:3] and by_user("bob") == bob  # ann down to 200 KB, oldest first; bob was over too
    assert all(e["why"] == "size" for e in report["deleted_jobs"])
    assert disk_use(settings, store)["users"]["ann"]["outputs_bytes"] == 200 * 1024


def test_admin_cli_disk_and_retention(world, capsys, monkeypatch):
    settings, store = world
    monkeypatch.setenv("IMAGESMITH_HOME", str(settings.home))
    finished(settings, store, "ann", 30, age_days=10)
    finished(settings, store, "bob", 7, age_days=1)
    code, out, _ = run_cli(capsys, "admin", "disk", "--json")
    use = json.loads(out)
    assert code == 0 and use["users"]["ann"]["total_bytes"] == 30 * 1024 and use["total_bytes"] == 37 * 1024
    code, out, _ = run_cli(capsys, "admin", "disk")
    assert code == 0 and "ann" in out and "30.0 KB" in out
    code, out, _ = run_cli(capsys, "admin", "retention", "--max-age-days", "5", "--dry-run", "--json")
    assert code == 0 and [e["user"] for e in json.loads(out)["deleted_jobs"]] == ["ann"]
    monkeypatch.setenv("IMAGESMITH_RETENTION_DAYS", "5")
    code, out, _ = run_cli(capsys, "admin", "retention")
    assert code == 0 and "deleted 1 job(s)" in out
    assert json.loads(run_cli(capsys, "admin", "disk", "--json")[1])["total_bytes"] == 7 * 1024
    monkeypatch.delenv("IMAGESMITH_RETENTION_DAYS")
    code, _, err = run_cli(capsys, "admin", "retention")
    assert code == 2 and err.count("\n") == 1 and "no policy" in err
    code, _, err = run_cli(capsys, "admin", "retention", "--max-age-days", "-3")
    assert code == 2 and "above 0" in err
