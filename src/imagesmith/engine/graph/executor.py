"""Validation and execution of ComfyUI API-format prompts (``{node_id: {"class_type", "inputs"}}``).

Validation comes first and answers in ComfyUI's shapes: an error for the whole prompt (``invalid_prompt``,
``prompt_no_outputs``, ``prompt_outputs_failed_validation``) and ``node_errors`` per node (``required_input_missing``,
``value_not_in_list``, ``return_type_mismatch``, ...). A prompt with some valid and some invalid output nodes runs
the valid ones.

Execution is topological (each output pulls what it needs) with a cache of node outputs keyed by the node's class,
its constant inputs and the keys of everything upstream, kept between prompts: re-running with only the seed
changed re-runs the sampler and what follows; an identical prompt runs nothing and re-sends the output nodes'
results."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import BadRequest
from ...core.progress import CancelToken
from .spec import PRIMITIVES, Input, Node, choices_of

Event = Callable[[str, dict], None]
MAX_DEPTH = 200
"""the longest chain of nodes a prompt may have (real workflows are a few dozen deep; execution recurses)"""


class GraphError(BadRequest):
    """A prompt ComfyUI would refuse: ``payload`` is its 400 body (``{"error": {...}, "node_errors": {...}}``)."""

    def __init__(self, error: dict, node_errors: dict | None = None):
        super().__init__(error["message"] + (f": {error['details']}" if error.get("details") else ""))
        self.payload = {"error": error, "node_errors": node_errors or {}}


@dataclass
class Checked:
    outputs: list[str]
    """the output nodes that validated, in the prompt's order"""
    node_errors: dict[str, dict]


@dataclass
class GraphContext:
    """What nodes see while a prompt runs."""
    engine: Any
    output_dir: Path
    temp_dir: Path
    input_dir: Path
    prompt: dict
    prompt_id: str = ""
    extra_pnginfo: dict = field(default_factory=dict)
    event: Event | None = None
    cancel: CancelToken | None = None
    node: str = ""
    screen: Callable[[Any], Any] | None = None
    """the safety gate on saved images: the image to write (maybe blurred), or None to withhold it"""

    def send(self, name: str, data: dict) -> None:
        if self.event is not None:
            self.event(name, {**data, "prompt_id": self.prompt_id})

    def step(self, value: int, total: int) -> None:
        """A sampler's step: ComfyUI's ``progress`` message; also where a cancel takes effect."""
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        self.send("progress", {"value": value, "max": total, "node": self.node})


@dataclass
class RunResult:
    outputs: dict[str, dict]
    """output node id -> its ui dict (``{"images": [{"filename", "subfolder", "type"}]}``)"""
    executed: list[str]
    cached: list[str]
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)


def _error(kind: str, message: str, details: str = "", **extra) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int) \
        and not isinstance(value[1], bool)


class GraphExecutor:
    """One per worker: the node set, the lists the validation checks choices against, and the output cache."""

    def __init__(self, nodes: dict[str, Node], lists: Callable[[], dict[str, list[str]]], *, cache_size: int = 256):
        self.nodes = nodes
        self.lists = lists
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ validation
    def validate(self, prompt: Any, *, lists: dict[str, list[str]] | None = None) -> Checked:
        """Checked outputs, or GraphError with ComfyUI's 400 body. `lists` adds or replaces dynamic choices (the
        caller's input images)."""
        if not isinstance(prompt, dict) or not prompt:
            raise GraphError(_error("invalid_prompt", "Cannot execute because the prompt is not an object of "
                                    "nodes.", ""))
        if len(prompt) > 2000:
            raise GraphError(_error("invalid_prompt", "Cannot execute because the prompt has more than 2000 "
                                    "nodes.", ""))
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                raise GraphError(_error("invalid_prompt", "Cannot execute because a node is missing the "
                                        "class_type property.", f"Node ID '#{node_id}'"))
            if not isinstance(node["class_type"], str) or node["class_type"] not in self.nodes:
                raise GraphError(_error("missing_node_type", f"Node '{node['class_type']}' not found. The custom "
                                        "node may not be installed.", f"Node ID '#{node_id}'",
                                        node_id=node_id, class_type=str(node["class_type"])))
            if not isinstance(node.get("inputs", {}), dict):
                raise GraphError(_error("invalid_prompt", "Cannot execute because a node's inputs are not an "
                                        "object.", f"Node ID '#{node_id}'"))
        if _depth(prompt) > MAX_DEPTH:
            raise GraphError(_error("invalid_prompt", f"Cannot execute because the graph is more than {MAX_DEPTH} "
                                    "nodes deep.", ""))
        outputs = [i for i, n in prompt.items() if self.nodes[n["class_type"]].output_node]
        if not outputs:
            raise GraphError(_error("prompt_no_outputs", "Prompt has no outputs", ""))
        lists = {**self.lists(), **(lists or {})}
        results: dict[str, tuple[bool, list[dict]]] = {}
        good, node_errors = [], {}
        for out in outputs:
            ok = self._validate_node(prompt, out, lists, results, set())
            if ok:
                good.append(out)
            else:
                for node_id, (valid, errors) in results.items():
                    if not valid and errors:
                        entry = node_errors.setdefault(node_id, {"errors": errors, "dependent_outputs": [],
                                                                 "class_type": prompt[node_id]["class_type"]})
                        if out not in entry["dependent_outputs"] and self._depends(prompt, out, node_id):
                            entry["dependent_outputs"].append(out)
        if not good:
            details = "\n".join(f"{prompt[n]['class_type']} {n}: " + "; ".join(
                f"{e['message']}: {e['details']}" for e in v["errors"]) for n, v in node_errors.items())
            raise GraphError(_error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                    details), node_errors)
        return Checked(good, node_errors)

    def _depends(self, prompt: dict, out: str, target: str) -> bool:
        seen, todo = set(), [out]
        while todo:
            n = todo.pop()
            if n == target:
                return True
            if n in seen or n not in prompt:
                continue
            seen.add(n)
            todo += [v[0] for v in prompt[n].get("inputs", {}).values() if is_link(v)]
        return False

    def _validate_node(self, prompt: dict, node_id: str, lists: dict, results: dict, stack: set) -> bool:
        if node_id in results:
            return results[node_id][0]
        if node_id in stack:
            results[node_id] = (False, [_error("dependency_cycle", "Dependency cycle detected",
                                               f"Node ID '#{node_id}'")])
            return False
        stack = stack | {node_id}
        node = prompt[node_id]
        spec = self.nodes[node["class_type"]]
        inputs = node.get("inputs", {})
        errors: list[dict] = []
        valid = True
        for name, inp in spec.inputs.items():
            if name not in inputs:
                if not inp.optional:
                    errors.append(_error("required_input_missing", "Required input is missing", name,
                                         input_name=name))
                continue
            value = inputs[name]
            if isinstance(value, list) and not inp.is_widget or is_link(value):
                if not is_link(value):
                    errors.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of "
                                         "[node_id, slot_index]", name, input_name=name, received_value=value))
                    continue
                up, slot = value
                if up not in prompt:
                    errors.append(_error("exception_during_inner_validation", "Exception when validating inner "
                                         "node", f"{name}: node '#{up}' does not exist", input_name=name))
                    continue
                up_spec = self.nodes[prompt[up]["class_type"]]
                if not 0 <= slot < len(up_spec.outputs):
                    errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                         f"{name}, node '#{up}' has no output {slot}", input_name=name))
                    continue
                received = up_spec.outputs[slot][0]
                wanted = inp.type if inp.type != "COMBO" else "COMBO"
                if not _types_match(received, wanted, inp):
                    errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                         f"{name}, received_type({received}) mismatch input_type({wanted})",
                                         input_name=name, received_type=received))
                    continue
                if not self._validate_node(prompt, up, lists, results, stack):
                    valid = False
                continue
            err = _check_value(name, inp, value, lists)
            if err is not None:
                errors.append(err)
        valid = valid and not errors
        results[node_id] = (valid, errors)
        return valid

    # ------------------------------------------------------------------ execution
    def signature(self, prompt: dict, node_id: str, memo: dict[str, str], ctx: GraphContext | None = None) -> str:
        if node_id in memo:
            return memo[node_id]
        node = prompt[node_id]
        spec = self.nodes[node["class_type"]]
        parts: list[Any] = [node["class_type"]]
        values = {}
        for name in sorted(node.get("inputs", {})):
            if name not in spec.inputs:
                continue  # extra inputs (the frontend's leftovers) decide nothing
            value = node["inputs"][name]
            if is_link(value) and not spec.inputs[name].is_widget or is_link(value) and value[0] in prompt:
                parts.append([name, self.signature(prompt, value[0], memo, ctx), value[1]])
            else:
                parts.append([name, value])
                values[name] = value
        if spec.fingerprint is not None and ctx is not None:
            parts.append(["*", spec.fingerprint(ctx, **values)])
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
        memo[node_id] = key
        return key

    def run(self, prompt: dict, ctx: GraphContext, outputs: list[str]) -> RunResult:
        start = time.perf_counter()
        memo: dict[str, str] = {}
        needed: list[str] = []
        for out in outputs:
            self._collect(prompt, out, needed)
        with self._lock:
            cached = [n for n in needed if self.signature(prompt, n, memo, ctx) in self._cache]
        ctx.send("execution_cached", {"nodes": cached, "timestamp": int(time.time() * 1000)})
        done: dict[str, tuple] = {}
        executed: list[str] = []
        result = RunResult({}, executed, cached)
        for out in outputs:
            value = self._execute(prompt, out, ctx, memo, done, executed)
            ui = value[0].get("ui") if value and isinstance(value[0], dict) else None
            if ui is not None:
                result.outputs[out] = ui
                if out not in executed:  # cached: ComfyUI re-sends the output node's result
                    ctx.send("executed", {"node": out, "display_node": out, "output": ui})
        result.seconds = time.perf_counter() - start
        return result

    def _collect(self, prompt: dict, node_id: str, order: list[str]) -> None:
        if node_id in order:
            return
        for value in prompt[node_id].get("inputs", {}).values():
            if is_link(value) and value[0] in prompt:
                self._collect(prompt, value[0], order)
        order.append(node_id)

    def _execute(self, prompt: dict, node_id: str, ctx: GraphContext, memo: dict, done: dict,
                 executed: list[str]) -> tuple:
        if node_id in done:
            return done[node_id]
        key = self.signature(prompt, node_id, memo, ctx)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is not None:
            done[node_id] = hit
            return hit
        node = prompt[node_id]
        spec = self.nodes[node["class_type"]]
        kwargs = {}
        for name, inp in spec.inputs.items():
            if name not in node.get("inputs", {}):
                continue
            value = node["inputs"][name]
            if is_link(value) and (not inp.is_widget or value[0] in prompt):
                kwargs[name] = self._execute(prompt, value[0], ctx, memo, done, executed)[value[1]]
            else:
                kwargs[name] = _convert(inp, value)
        if ctx.cancel is not None:
            ctx.cancel.raise_if_cancelled()
        ctx.node = node_id
        ctx.send("executing", {"node": node_id, "display_node": node_id})
        out = spec.run(ctx, **kwargs)
        done[node_id] = out
        executed.append(node_id)
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        ui = out[0].get("ui") if out and isinstance(out[0], dict) else None
        if spec.output_node and ui is not None:
            ctx.send("executed", {"node": node_id, "display_node": node_id, "output": ui})
        return out

    def free(self) -> int:
        """Forget every cached output (ComfyUI's ``/free`` with free_memory). Returns how many."""
        with self._lock:
            n = len(self._cache)
            self._cache.clear()
            return n


def _depth(prompt: dict) -> int:
    """The longest chain of links (Kahn's order, no recursion; nodes on a cycle are left to validation)."""
    deps = {n: {v[0] for v in node.get("inputs", {}).values() if is_link(v) and v[0] in prompt and v[0] != n}
            for n, node in prompt.items()}
    users: dict[str, list[str]] = {n: [] for n in prompt}
    for n, ds in deps.items():
        for d in ds:
            users[d].append(n)
    waiting = {n: len(ds) for n, ds in deps.items()}
    depth = {n: 1 for n in prompt}
    ready = [n for n, k in waiting.items() if k == 0]
    while ready:
        n = ready.pop()
        for u in users[n]:
            depth[u] = max(depth[u], depth[n] + 1)
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    return max(depth.values(), default=0)


def _types_match(received: str, wanted: str, inp: Input) -> bool:
    if "*" in (received, wanted):
        return True
    if inp.type == "COMBO":
        return received in ("COMBO", "*") or received.startswith("COMBO")
    return set(received.split(",")) & set(wanted.split(",")) != set()


def _convert(inp: Input, value: Any) -> Any:
    if inp.type == "INT":
        return int(value)
    if inp.type == "FLOAT":
        return float(value)
    if inp.type == "STRING":
        return str(value)
    if inp.type == "BOOLEAN":
        return bool(value)
    return value


def _check_value(name: str, inp: Input, value: Any, lists: dict) -> dict | None:
    extra = {"input_name": name, "received_value": value}
    if inp.type in PRIMITIVES:
        try:
            if inp.type == "INT" and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
                raise ValueError("not a whole number")
            if inp.type in ("INT", "FLOAT") and isinstance(value, str):
                raise ValueError("a string")
            if inp.type == "STRING" and not isinstance(value, (str, int, float)):
                raise ValueError("not text")
            if inp.type == "BOOLEAN" and not isinstance(value, (bool, int)):
                raise ValueError("not a boolean")
            if isinstance(value, (dict, list)):
                raise ValueError("not a single value")
            v = _convert(inp, value)
        except (TypeError, ValueError, OverflowError) as exc:
            return _error("invalid_input_type", f"Failed to convert an input value to a {inp.type} value",
                          f"{name}, {value}, {exc}", **extra)
        if inp.type in ("INT", "FLOAT"):
            if v != v:  # NaN
                return _error("invalid_input_type", f"Failed to convert an input value to a {inp.type} value",
                              f"{name}, {value}, not a number", **extra)
            if inp.min is not None and v < inp.min:
                return _error("value_smaller_than_min", f"Value {v} smaller than min of {inp.min}", name, **extra)
            if inp.max is not None and v > inp.max:
                return _error("value_bigger_than_max", f"Value {v} bigger than max of {inp.max}", name, **extra)
        if inp.type == "STRING" and len(str(v)) > 100_000:
            return _error("value_bigger_than_max", "Text longer than 100000 characters", name, **extra)
        return None
    if inp.type == "COMBO":
        allowed = choices_of(inp, lists)
        if isinstance(value, str) and inp.upload and inp.choices == "input" and value.endswith(" [input]"):
            value = value.removesuffix(" [input]")  # the frontend's annotated name (mask editor's clipspace files)
        if not isinstance(value, str) or value not in allowed:
            shown = allowed if len(allowed) <= 20 else allowed[:20] + ["..."]
            return _error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {shown}",
                          input_config=shown, **extra)
        return None
    return _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", name,
                  **extra)
