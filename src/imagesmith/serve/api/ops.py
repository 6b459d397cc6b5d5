"""Operations: health and readiness (no caller needed), Prometheus metrics, the model list, the studio page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, PlainTextResponse

from .context import Caller, Svc

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter(tags=["ops"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def studio_page():
    return (STATIC / "index.html").read_text(encoding="utf-8")


@router.get("/healthz")
def healthz():
    return {"ok": True}


@router.get("/readyz")
def readyz(svc: Svc):
    svc.store.depth()
    return {"ok": True, "database": svc.store.url.split(":", 1)[0]}


@router.get("/metrics")
def metrics(svc: Svc, _: Caller):
    lines = ["# TYPE imagesmith_jobs gauge"]
    for status, n in sorted(svc.store.depth().items()):
        lines.append(f'imagesmith_jobs{{status="{status}"}} {n}')
    return PlainTextResponse("\n".join(lines) + "\n")


@router.get("/v1/models", tags=["models"])
def models(svc: Svc, _: Caller):
    from ...models.house import make_registry
    return {"models": [{"name": e.name, "kind": e.kind, "arch": e.arch} for e in make_registry(svc.settings).list()]}
