"""MkDocs hook for the jobq site (mkdocs.yml ``hooks:``).

- ``{{ jobq_version }}`` in a page becomes the version in ``pyproject.toml`` (the one source of
  the version: the wheel's metadata, ``jobq --version`` and ``jobq.__version__`` read it too).
- ``<!-- openapi -->`` in a page becomes the HTTP reference, rendered as Markdown tables from
  ``jobq/openapi.json`` (the document ``jobq serve`` answers at ``/openapi.json``), so the site
  needs no Swagger UI from a CDN and cannot drift from the shipped document.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "jobq" / "openapi.json"
VERSION_MARK = "{{ jobq_version }}"
OPENAPI_MARK = "<!-- openapi -->"
METHODS = ("get", "post", "put", "patch", "delete")


def project_version() -> str:
    """The ``version`` of the ``[project]`` table of pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    found = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    if found is None:
        raise ValueError("pyproject.toml: no version in [project]")
    return found.group(1)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _anchor(name: str) -> str:
    return "schema-" + name.lower()


def schema_type(schema: dict[str, Any]) -> str:
    """A short Markdown rendering of a schema: a link for a $ref, ``a | b`` for oneOf."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return f"[{name}](#{_anchor(name)})"
    if "oneOf" in schema:
        return " or ".join(schema_type(s) for s in schema["oneOf"])
    kind = str(schema.get("type", "any"))
    if kind == "object" and schema.get("properties"):
        fields = ", ".join(f"`{k}`: {schema_type(v)}" for k, v in schema["properties"].items())
        kind = f"object {{{fields}}}"
    elif kind == "array":
        items = schema.get("items") or {}
        kind = f"array of {schema_type(items)}" if items else "array"
    if "format" in schema:
        kind += f" ({schema['format']})"
    if schema.get("nullable"):
        kind += ", nullable"
    return kind


def _constraints(schema: dict[str, Any]) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("maxLength", "length ≤"),
        ("maxItems", "items ≤"),
    ):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "default" in schema:
        parts.append(f"default `{json.dumps(schema['default'])}`")
    if "example" in schema:
        parts.append(f"e.g. `{schema['example']}`")
    for sub in schema.get("oneOf", []):
        more = _constraints(sub)
        if more:
            parts.append(more)
    return "; ".join(parts)


def _describe(schema: dict[str, Any], description: str = "") -> str:
    text = description or str(schema.get("description", ""))
    more = _constraints(schema)
    return _cell("; ".join(p for p in (text, more) if p))


def _body(content: dict[str, Any]) -> str:
    return "; ".join(f"`{ctype}`: {schema_type(media.get('schema', {}))}" for ctype, media in content.items())


def operation(path: str, method: str, op: dict[str, Any], open_routes: set[str]) -> list[str]:
    out = [f"### `{method.upper()} {path}`", "", _cell(op.get("summary", "")) + ".", ""]
    if op.get("description"):
        out += [str(op["description"]), ""]
    if op.get("security") == [] or path in open_routes:
        out += ["No token needed (open for probes and scrapers).", ""]
    params = op.get("parameters", [])
    if params:
        out += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in params:
            schema = p.get("schema", {})
            required = "yes" if p.get("required") else "no"
            desc = _describe(schema, p.get("description", ""))
            out.append(f"| `{p['name']}` | {p['in']} | {schema_type(schema)} | {required} | {desc} |")
        out.append("")
    body = op.get("requestBody")
    if body:
        out += [
            f"Request body ({'required' if body.get('required') else 'optional'}): {_body(body['content'])}",
            "",
        ]
    out += ["| status | meaning | body | headers |", "|---|---|---|---|"]
    for status, resp in op.get("responses", {}).items():
        headers = ", ".join(
            f"`{name}`: {_cell(h.get('description', ''))}" for name, h in resp.get("headers", {}).items()
        )
        content = _body(resp.get("content", {}))
        out.append(f"| {status} | {_cell(resp.get('description', ''))} | {content} | {headers} |")
    out.append("")
    return out


def render_openapi(doc: dict[str, Any]) -> str:
    """The whole document as Markdown: the routes, then the schemas they refer to."""
    info = doc.get("info", {})
    out = [
        f"OpenAPI {doc.get('openapi')} document *{info.get('title')}*, version {info.get('version')}. "
        + str(info.get("description", "")),
        "",
    ]
    open_routes = {
        path
        for path, ops in doc.get("paths", {}).items()
        if all(op.get("security") == [] for m, op in ops.items() if m in METHODS)
    }
    for path, ops in doc.get("paths", {}).items():
        for method in METHODS:
            if method in ops:
                out += operation(path, method, ops[method], open_routes)
    out += ["## Schemas", ""]
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        out += [f"### {name} {{ #{_anchor(name)} }}", ""]
        if schema.get("description"):
            out += [str(schema["description"]), ""]
        if schema.get("additionalProperties") is False:
            out += ["Fields not listed here are refused.", ""]
        required = set(schema.get("required", []))
        out += ["| field | type | required | description |", "|---|---|---|---|"]
        for field, sub in schema.get("properties", {}).items():
            req = "yes" if field in required else "no"
            out.append(f"| `{field}` | {schema_type(sub)} | {req} | {_describe(sub)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs event: fill in the version and the OpenAPI reference."""
    if VERSION_MARK in markdown:
        markdown = markdown.replace(VERSION_MARK, project_version())
    if OPENAPI_MARK in markdown:
        doc = json.loads(OPENAPI.read_text(encoding="utf-8"))
        markdown = markdown.replace(OPENAPI_MARK, render_openapi(doc))
    return markdown
