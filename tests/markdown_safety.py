"""Shared by the page tests: find Markdown a user-controlled string could have turned into a link
or an image (issue #12 item 5). Every string rendered as Markdown is collected: markdown,
captions, alerts, expander and tab labels, widget and metric help."""

from __future__ import annotations

import re

from streamlit.testing.v1 import AppTest

MALICIOUS_IMAGE = "![x](http://example.invalid/x.png)"
MALICIOUS_LINK = "[click](http://example.invalid/)"
# A '![' or '](' not preceded by an escaping backslash makes an image or a link.
_ACTIVE = re.compile(r"(?<!\\)!(?<!\\)\[|(?<!\\)\]\(")


def rendered_markdown(at: AppTest) -> list[str]:
    """Every string on the page that Streamlit renders as Markdown."""
    found: list[str] = []

    def visit(node) -> None:
        proto = getattr(node, "proto", None)
        kind = getattr(node, "type", "")
        if kind in ("markdown", "caption", "divider", "info", "success", "warning", "error",
                    "exception", "toast"):
            found.append(str(getattr(node, "value", "") or getattr(proto, "body", "")))
        if kind == "image":  # image captions are Markdown too
            found.extend(image.caption for image in proto.imgs)
        if kind in ("expander", "tab", "status"):
            found.append(str(getattr(node, "label", "")))
        for attribute in ("help", "label"):
            value = getattr(proto, attribute, None) if kind not in ("expander", "status") else None
            if isinstance(value, str) and value:
                found.append(value)
        for child in getattr(node, "children", {}).values():
            visit(child)

    visit(at._tree)
    return found


def active_markdown(at: AppTest) -> list[str]:
    """The rendered Markdown strings that contain an unescaped image or link."""
    return [text for text in rendered_markdown(at) if _ACTIVE.search(text)]


def plain_text(at: AppTest) -> str:
    """What st.text, dataframes' strings and selectbox options show, as typed."""
    parts = [t.value for t in at.text]
    for box in at.selectbox:
        parts += [str(o) for o in box.options]
    return "\n".join(parts)
