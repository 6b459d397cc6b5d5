"""The prompt assistant, offline (document 1's GPT helper): ``imagesmith prompt expand "a white cat, 3D" --n 5``.

A short request becomes N detailed prompts, each adding a style, a composition, a camera, a lighting, a palette
and a finish drawn from curated vocabularies. The draws are ranked for relevance with the packaged sentence
encoder (all-MiniLM-L6-v2: cosine between the request and each phrase) and sampled from the best few with a
seeded generator, so the prompts fit the request, differ from each other, and repeat for the same seed."""

from __future__ import annotations

import numpy as np

VOCAB: dict[str, tuple[str, ...]] = {
    "style": ("3D render, octane render", "studio product photograph", "claymation style", "isometric 3D illustration",
              "flat vector illustration", "watercolor painting", "cinematic film still", "anime key visual",
              "oil painting, impasto", "low-poly 3D art", "paper cut-out craft", "pixel art", "pencil sketch",
              "editorial fashion photograph", "macro nature photograph", "children's book illustration"),
    "composition": ("centered composition", "rule of thirds", "close-up", "wide shot", "top-down flat lay",
                    "symmetrical composition", "three-quarter view", "low angle hero shot", "negative space",
                    "full body shot"),
    "camera": ("85mm lens, shallow depth of field", "35mm lens", "macro lens, extreme detail", "f/1.8 bokeh",
               "tilt-shift", "wide-angle lens", "medium format camera", "telephoto compression"),
    "lighting": ("soft studio lighting", "golden hour sunlight", "rim light", "dramatic chiaroscuro", "neon glow",
                 "overcast diffuse light", "volumetric light rays", "candlelight", "high-key lighting",
                 "moody low-key lighting"),
    "palette": ("pastel palette", "vibrant saturated colors", "muted earth tones", "monochrome", "teal and orange",
                "warm autumn palette", "cool blue tones", "black and white"),
    "finish": ("highly detailed", "sharp focus", "clean background", "soft textures", "glossy materials",
               "matte finish", "fine film grain", "intricate details"),
}


class PromptAssistant:
    def __init__(self, top: int = 4):
        from ..models.house import load_text_encoder
        from ..models.house_clip import pooled_features
        self._tok, self._enc = load_text_encoder()
        self._pool = pooled_features
        self.top = top
        self._vocab = {k: (list(v), self._embed(list(v))) for k, v in VOCAB.items()}

    def _embed(self, texts: list[str]) -> np.ndarray:
        e = self._pool(texts, self._tok, self._enc).float().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def ranked(self, request: str, category: str) -> list[tuple[str, float]]:
        phrases, emb = self._vocab[category]
        q = self._embed([request])[0]
        sims = emb @ q
        order = np.argsort(-sims)
        return [(phrases[i], round(float(sims[i]), 4)) for i in order]

    def expand(self, request: str, n: int = 5, seed: int = 0, llm=None) -> list[dict]:
        """N prompts (each with the phrases it added and their relevance), reproducible for a seed. With ``llm``
        (a :class:`~imagesmith.workflows.llm.LLMConfig`, e.g. ``LLMConfig.from_env()``) an OpenAI-compatible
        model writes them (document 1's GPT helper); if it fails or answers badly, the offline way does, and
        each prompt says which (``source``, with ``llm_error`` on a fallback)."""
        request = " ".join(request.split())
        if not request:
            from ..core.errors import BadRequest
            raise BadRequest("give a short request to expand, e.g. 'a white cat, 3D'")
        # Midjourney-style parameters (--ar 9:16 --no blur --seed 5) are not words to expand: they are checked
        # here, kept out of the ranking and the LLM's request, and put back at the end of every prompt
        from ..engine.prompts import extract_prompt_params
        core, _ = extract_prompt_params(request)
        params = request[len(core):].strip()
        if not core.strip():
            from ..core.errors import BadRequest
            raise BadRequest("give a short request to expand before its --parameters, e.g. 'a white cat --ar 9:16'")
        llm_error = None
        out = None
        if llm is not None:
            try:
                out = self._expand_llm(core, n, llm)
            except Exception as exc:  # noqa: BLE001 - an unreachable or confused LLM must not fail the request
                llm_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if out is None:
            out = self._expand_offline(core, n, seed)
        for item in out:
            if params:
                item["prompt"] = f"{item['prompt']} {params}"
                item["parameters"] = params
            if llm_error:
                item["llm_error"] = llm_error
        return out

    @staticmethod
    def _expand_llm(request: str, n: int, llm) -> list[dict]:
        from .llm import chat, json_object
        system = ("You write prompts for a text-to-image model. Expand the user's short request into detailed "
                  "prompts that each name a style, a composition, a camera or lens, the lighting and a colour palette, "
                  f'as comma-separated phrases. Answer with JSON only: {{"prompts": [{n} strings]}}.')
        answer = json_object(chat(llm, system, request))
        prompts = [" ".join(str(p).split()) for p in answer.get("prompts", []) if str(p).strip()]
        if len(prompts) < n:
            raise ValueError(f"the LLM gave {len(prompts)} prompts, {n} were asked for")
        return [{"prompt": p, "source": "llm"} for p in prompts[:n]]

    def _expand_offline(self, request: str, n: int, seed: int) -> list[dict]:
        rng = np.random.default_rng(seed)
        ranked = {c: self.ranked(request, c)[: self.top] for c in VOCAB}
        out, seen = [], set()
        for _ in range(n * 8):
            if len(out) == n:
                break
            picks = {}
            for c, options in ranked.items():
                w = np.exp(np.array([s for _, s in options]) * 10.0)
                picks[c] = options[int(rng.choice(len(options), p=w / w.sum()))]
            key = tuple(p for p, _ in picks.values())
            if key in seen:
                continue
            seen.add(key)
            prompt = ", ".join([request] + [p for p, _ in picks.values()])
            out.append({"prompt": prompt, "source": "offline",
                        "added": {c: {"phrase": p, "relevance": s} for c, (p, s) in picks.items()}})
        return out
