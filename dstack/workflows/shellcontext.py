"""Where a placeholder sits in a shell text (bare, inside quotes, in a here-document), and how a value is
referred to from there so that the shell never parses it."""

from __future__ import annotations

import re

Piece = tuple[str, bool]  # literal text (safe in any context), or a shell variable's name when True


def render(pieces: list[Piece], context: str) -> str:
    """Literal text and references written for their context: `"${V}"` bare, `${V}` inside double quotes
    or a here-document, `'"${V}"'` inside single quotes (closed and reopened), `'"${V}"$'` inside $'…'."""
    if context in ("single", "ansi"):
        inner = "".join("${" + t + "}" if ref else t for t, ref in pieces)
        return "'\"" + inner + '"' + ("'" if context == "single" else "$'")
    if context in ("double", "heredoc"):
        return "".join("${" + t + "}" if ref else t for t, ref in pieces)
    return "".join('"${' + t + '}"' if ref else t for t, ref in pieces)


_BARE_LIKE = ("bare", "cmdsub", "paren", "backtick")
_WORD_START = set(" \t\n;&|()<>")
_HEREDOC = re.compile(r"<<(-?)[ \t]*(?:'([^'\n]*)'|\"([^\"\n]*)\"|\\?([^\s;&|<>()'\"]+))")


def placeholders(text: str, pattern: re.Pattern[str]) -> list[tuple[re.Match[str], str]]:
    """Every placeholder in a shell text with the quoting it sits in: bare, double, single, ansi ($'…'),
    heredoc (<<EOF body) or quoted-heredoc (<<'EOF' body), tracking quotes, $(…), `…`, ${…} and comments."""
    found: list[tuple[re.Match[str], str]] = []
    stack = ["bare"]
    pending: list[tuple[str, bool, bool]] = []  # here-documents that start at the next newline
    i, n = 0, len(text)

    def context() -> str:
        for state in reversed(stack):
            if state != "brace":
                return "bare" if state in _BARE_LIKE else state
        return "bare"

    while i < n:
        match = pattern.match(text, i)
        if match:
            found.append((match, context()))
            i = match.end()
            continue
        c, top = text[i], stack[-1]
        if top == "single":
            if c == "'":
                stack.pop()
        elif top == "ansi":
            if c == "\\":
                i += 1
            elif c == "'":
                stack.pop()
        elif top == "double":
            if c == "\\":
                i += 1
            elif c == '"':
                stack.pop()
            elif text.startswith("$(", i):
                stack.append("cmdsub")
                i += 1
            elif text.startswith("${", i):
                stack.append("brace")
                i += 1
            elif c == "`":
                stack.append("backtick")
        else:  # bare, $(…), (…), `…`, ${…}
            if c == "\\":
                i += 1
            elif c == "'":
                stack.append("single")
            elif c == '"':
                stack.append("double")
            elif text.startswith("$'", i):
                stack.append("ansi")
                i += 1
            elif text.startswith("$(", i):
                stack.append("cmdsub")
                i += 1
            elif text.startswith("${", i):
                stack.append("brace")
                i += 1
            elif c == "(" and top != "brace":
                stack.append("paren")
            elif c == ")" and top in ("cmdsub", "paren"):
                stack.pop()
            elif c == "}" and top == "brace":
                stack.pop()
            elif c == "`":
                if top == "backtick":
                    stack.pop()
                else:
                    stack.append("backtick")
            elif c == "#" and (i == 0 or text[i - 1] in _WORD_START):
                end = text.find("\n", i)
                end = n if end < 0 else end
                found += [(m, "bare") for m in pattern.finditer(text, i, end)]
                i = end
                continue
            elif text.startswith("<<", i) and not text.startswith("<<<", i):
                doc = _HEREDOC.match(text, i)
                if doc:
                    quoted = doc.group(4) is None or text[doc.start(4) - 1] == "\\"
                    delimiter = next(g for g in doc.group(2, 3, 4) if g is not None)
                    pending.append((delimiter, quoted, bool(doc.group(1))))
                    i = doc.end()
                    continue
            elif c == "\n" and pending:
                i = _skip_heredocs(text, i + 1, pending, pattern, found)
                pending = []
                continue
        i += 1
    return found


def _skip_heredocs(
    text: str,
    i: int,
    pending: list[tuple[str, bool, bool]],
    pattern: re.Pattern[str],
    found: list[tuple[re.Match[str], str]],
) -> int:
    """Read the bodies of `pending` here-documents from `i`; record their placeholders; return where the
    shell text goes on."""
    for delimiter, quoted, strip_tabs in pending:
        while i < len(text):
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            body_line = text[i:end]
            if (body_line.lstrip("\t") if strip_tabs else body_line) == delimiter:
                i = end + 1
                break
            found += [(m, "quoted-heredoc" if quoted else "heredoc") for m in pattern.finditer(text, i, end)]
            i = end + 1
    return i
