"""ComfyUI's UI workflow format (what the frontend saves and the templates ship: ``nodes`` with ``widgets_values``,
``links``) to the API format ``/prompt`` takes, by the frontend's own rules:

- notes, reroutes and primitive nodes are not executed: a reroute passes its link on, a primitive's value goes
  into the widget it feeds;
- muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass each input through to the output of the same
  type;
- widget values are read in the node's input order (required, then optional), skipping inputs fed by a link, and
  skipping the extra "control after generate" value that follows a seed;
- a link becomes ``[from_node_id, from_slot]`` with node ids as strings."""

from __future__ import annotations

from typing import Any

from ...core.errors import BadRequest
from .spec import Node

VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def ui_to_api(workflow: dict, nodes: dict[str, Node]) -> dict[str, dict]:
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise BadRequest("a UI workflow has a 'nodes' list (is this already an API-format prompt?)")
    workflow = flatten_subgraphs(workflow)
    by_id = {str(n["id"]): n for n in workflow["nodes"]}
    links: dict[int, tuple[str, int, str]] = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]), str(link.get("type", "*")))
        else:
            links[link[0]] = (str(link[1]), int(link[2]), str(link[5]) if len(link) > 5 else "*")

    def source(link_id: int | None, want_type: str | None = None, depth: int = 0) -> tuple[str, int] | None:
        """Where a link really starts: through reroutes and bypassed nodes; None when it ends at a muted node."""
        if link_id is None or link_id not in links or depth > 100:
            return None
        node_id, slot, ltype = links[link_id]
        node = by_id.get(node_id)
        if node is None:
            return None
        if node["type"] == "Reroute":
            return source((node.get("inputs") or [{}])[0].get("link"), want_type, depth + 1)
        if node.get("mode", 0) == BYPASSED:
            out_type = (node.get("outputs") or [{}] * (slot + 1))[slot].get("type", ltype)
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source(inp["link"], want_type, depth + 1)
            return None
        if node.get("mode", 0) == MUTED or node["type"] == "PrimitiveNode":
            return None
        return node_id, slot

    def primitive_value(link_id: int | None) -> tuple[bool, Any]:
        if link_id is None or link_id not in links:
            return False, None
        node = by_id.get(links[link_id][0])
        while node is not None and node["type"] == "Reroute":
            up = (node.get("inputs") or [{}])[0].get("link")
            node = by_id.get(links[up][0]) if up in links else None
        if node is not None and node["type"] == "PrimitiveNode" and node.get("widgets_values"):
            return True, node["widgets_values"][0]
        return False, None

    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node.get("type")
        if kind in VIRTUAL or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        spec = nodes.get(kind)
        if spec is None:
            raise BadRequest(f"node #{node.get('id')} is a {kind!r}, which imagesmith does not have")
        linked = {}
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            found, value = primitive_value(inp["link"])
            if found:  # a primitive's value stands in the widget it feeds
                linked[inp["name"]] = value
                continue
            src = source(inp["link"])
            if src is not None:
                linked[inp["name"]] = [src[0], src[1]]
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in spec.inputs})
            values = []
        values = list(values or [])
        i = 0
        for name, inp in spec.inputs.items():
            if not inp.is_widget:
                continue
            if i >= len(values):  # an older save without this widget's value: the frontend shows its default
                if name not in linked and inp.default is not None:
                    inputs[name] = inp.default
                continue
            if i < len(values):
                if name not in linked:
                    inputs[name] = values[i]
                i += 1
                if inp.control_after_generate and i < len(values) and (
                        isinstance(values[i], bool) or values[i] in CONTROL_VALUES):
                    i += 1
        inputs.update(linked)
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or spec.display_name}}
    return prompt


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SUBGRAPH_IN, SUBGRAPH_OUT = -10, -20


def _link_list(link) -> list:
    if isinstance(link, dict):
        return [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                link.get("type", "*")]
    return list(link)


def flatten_subgraphs(workflow: dict) -> dict:
    """A workflow whose subgraph instances are replaced by their inner nodes, with ids ``outer:inner`` (nested:
    ``a:b:c``), as the frontend does when it queues: links into a subgraph's inputs go straight to the inner nodes
    they feed, a subgraph input shown as a widget on the instance becomes a primitive value, and links from its
    outputs start at the inner node that produced them."""
    subs = {sg["id"]: sg for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
    if not subs:
        return workflow
    nodes = [dict(n) for n in workflow["nodes"]]
    links = [_link_list(l) for l in workflow.get("links") or []]
    counter = [max([l[0] for l in links] + [0]) + 1]
    for sg in subs.values():
        counter[0] = max([counter[0]] + [_link_list(l)[0] + 1 for l in sg.get("links") or []])
    expanded = 0
    while True:
        inst = next((n for n in nodes if n.get("type") in subs), None)
        if inst is None:
            break
        expanded += 1
        if expanded > 500:
            raise BadRequest("subgraphs nest too deep (more than 500 instances)")
        nodes, links = _expand(inst, subs[inst["type"]], nodes, links, counter)
    out = {k: v for k, v in workflow.items() if k != "definitions"}
    out["nodes"], out["links"] = nodes, links
    return out


def _expand(inst: dict, sg: dict, nodes: list, links: list, counter: list) -> tuple[list, list]:
    prefix = f"{inst['id']}:"
    muted = inst.get("mode", 0) == MUTED
    inner = []
    for n in sg.get("nodes") or []:
        m = {**n, "id": prefix + str(n["id"]), "inputs": [dict(i) for i in n.get("inputs") or []]}
        if muted:
            m["mode"] = MUTED
        inner.append(m)
    outer_in = {i.get("name"): i.get("link") for i in inst.get("inputs") or []}
    widget_values = list(inst.get("widgets_values") or []) if isinstance(inst.get("widgets_values"), list) else []
    feeds: dict[int, tuple] = {}  # subgraph input index -> (origin id, slot, type) or ("value", v)
    links_by_id = {l[0]: l for l in links}
    w = 0
    for k, sin in enumerate(sg.get("inputs") or []):
        link_id = outer_in.get(sin.get("name"))
        if link_id is not None and link_id in links_by_id:
            l = links_by_id[link_id]
            feeds[k] = (l[1], l[2], l[5])
        elif sin.get("type") in WIDGET_TYPES and w < len(widget_values):
            prim = {"id": f"{prefix}input{k}", "type": "PrimitiveNode", "mode": 0, "inputs": [],
                    "outputs": [{"type": sin.get("type"), "links": []}], "widgets_values": [widget_values[w]]}
            w += 1
            inner.append(prim)
            feeds[k] = (prim["id"], 0, sin.get("type"))
    remap: dict[int, int] = {}
    new_links = []
    produced: dict[int, tuple] = {}  # subgraph output index -> (origin id, slot)
    for raw in sg.get("links") or []:
        l = _link_list(raw)
        old, origin, oslot, target, tslot, ltype = l
        if origin == SUBGRAPH_IN:
            if oslot not in feeds:
                continue  # an input the instance leaves unconnected
            origin, oslot = feeds[oslot][0], feeds[oslot][1]
        else:
            origin = prefix + str(origin)
        if target == SUBGRAPH_OUT:
            produced[tslot] = (origin, oslot)
            continue
        new = counter[0]
        counter[0] += 1
        remap[old] = new
        new_links.append([new, origin, oslot, prefix + str(target), tslot, ltype])
    for m in inner:
        for i in m["inputs"]:
            if i.get("link") is not None:
                i["link"] = remap.get(i["link"])
    kept = []
    for l in links:
        if l[3] == inst["id"]:
            continue  # into the instance: replaced by the inner links above
        if l[1] == inst["id"]:
            if l[2] not in produced:
                continue
            l = [l[0], *produced[l[2]], *l[3:]]
        kept.append(l)
    nodes = [n for n in nodes if n is not inst] + inner
    return nodes, kept + new_links
