"""An OpenAI-compatible chat endpoint, configured by the environment (IMAGESMITH_LLM_URL, _MODEL, _KEY, _TIMEOUT):
what the storyboard (scenes, logic review) and the prompt assistant use when a user has an LLM. Stdlib only."""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import BadRequest


class LLMConfig(BaseModel):
    """An OpenAI-compatible chat endpoint (``POST {url}/v1/chat/completions``)."""

    model_config = ConfigDict(frozen=True)
    url: str = Field(..., min_length=1, description="base URL, e.g. http://127.0.0.1:8000 (or .../v1)")
    model: str = Field("default", description="model name sent in the request")
    key: str | None = Field(None, repr=False, exclude=True, description="bearer token; never written anywhere")
    timeout: float = Field(60.0, gt=0, le=600)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "LLMConfig | None":
        """IMAGESMITH_LLM_URL (required to enable), IMAGESMITH_LLM_MODEL, IMAGESMITH_LLM_KEY,
        IMAGESMITH_LLM_TIMEOUT. None when no URL is set: then the rules do everything."""
        env = os.environ if env is None else env
        url = (env.get("IMAGESMITH_LLM_URL") or "").strip()
        if not url:
            return None
        fields: dict = {"url": url, "model": env.get("IMAGESMITH_LLM_MODEL") or "default",
                        "key": env.get("IMAGESMITH_LLM_KEY") or None}
        if env.get("IMAGESMITH_LLM_TIMEOUT"):
            try:
                fields["timeout"] = float(env["IMAGESMITH_LLM_TIMEOUT"])
            except ValueError:
                raise BadRequest(f"IMAGESMITH_LLM_TIMEOUT must be seconds, got {env['IMAGESMITH_LLM_TIMEOUT']!r}") from None
        return cls(**fields)

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        if base.endswith("/chat/completions"):
            return base
        if base.endswith("/v1"):
            return base + "/chat/completions"
        return base + "/v1/chat/completions"


def chat(cfg: LLMConfig, system: str, user: str) -> str:
    import urllib.request
    body = json.dumps({"model": cfg.model, "temperature": 0,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    headers = {"Content-Type": "application/json"}
    if cfg.key:
        headers["Authorization"] = f"Bearer {cfg.key}"
    req = urllib.request.Request(cfg.endpoint, data=body.encode("utf-8"), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
        data = json.loads(resp.read().decode("utf-8"))
    return data["choices"][0]["message"]["content"]


def json_object(text: str) -> dict:
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the answer")
    return json.loads(text[start:end + 1])
