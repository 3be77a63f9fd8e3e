"""A built table (``report.tables.build_table`` / ``report.yours.build_yours``) as aligned text or markdown."""
from __future__ import annotations

from typing import Any, Dict

# ============================================================================================ rendering
def render_text(table: Dict[str, Any]) -> str:
    """Aligned plain-text rendering."""
    rows = [table["header"]] + table["rows"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table["header"]))]
    lines = [table["title"], ""]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [""] + [f"  {n}" for n in table["notes"]]
    return "\n".join(lines)


def render_markdown(table: Dict[str, Any]) -> str:
    """GitHub markdown rendering."""
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = [f"### {table['title']}", "", "| " + " | ".join(map(esc, table["header"])) + " |",
             "|" + "|".join("---" for _ in table["header"]) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in table["rows"]]
    lines += [""] + [f"- {n}" for n in table["notes"]]
    return "\n".join(lines) + "\n"


