"""A request body cut short, made whole again so the engine can parse it.

HAProxy hands the agent at most one buffer of body. Cut mid-way, the
structured bodies libmodsecurity parses fail:

- multipart/form-data: "Multipart: Final boundary missing", and then *no*
  part reaches ARGS or FILES at all, so even an attack in the first field
  would go uninspected; rule 200002 (rules/modsecurity.conf) denies with 400.
- JSON: the parser error denies too (200002), although the arguments before
  the cut were parsed.
- XML: libxml2 refuses a document whose elements are not all ended ("XML:
  Failed to parse document"), and 200002 denies it.

So a cut body is closed where it was cut, as if the client had stopped
there: the open multipart part is ended and the final boundary added; open
JSON strings, arrays and objects are closed; the XML elements still open are
ended. Every byte that arrived is still parsed and inspected; what is added
only ends structures. The few bytes that cannot be kept (a JSON number or
literal that may be cut, a cut XML name or entity reference, half an escape
or UTF-8 sequence) cannot carry an attack.

Nothing here can make the engine see less than it would have: a body these
functions do not recognise, or one whose structure is already broken, is
returned unchanged, and the engine's own parse error then denies it (fail
closed). A closing that does not match what the engine parses (another
boundary) leaves the body unparseable the same way. So does an XML body cut
before its root element or inside its DOCTYPE (an internal subset declares
entities: what it would have said is unknown), or one in UTF-16.
"""

from __future__ import annotations

import re

_MULTIPART = re.compile(rb"^\s*multipart/", re.I)
_JSON = re.compile(rb"^\s*application/(?:[a-z0-9.-]+\+)?json\s*(?:;|$)", re.I)
_XML = re.compile(rb"^\s*(?:application|text)/(?:[a-z0-9.-]+\+)?xml\s*(?:;|$)", re.I)
_BOUNDARY = re.compile(rb"boundary\s*=\s*(\"?)([^\";,\s]+)\1", re.I)


def close_cut_body(content_type: bytes, body: bytes) -> bytes:
    """The body, closed where it was cut if it is multipart, JSON or XML;
    otherwise (or when its structure is not understood) unchanged."""
    if not body:
        return body
    if _MULTIPART.match(content_type):
        boundaries = _BOUNDARY.findall(content_type)
        if len(boundaries) != 1:
            return body   # none, or ambiguous: let the engine judge
        return close_multipart(body, boundaries[0][1])
    if _JSON.match(content_type):
        return close_json(body)
    if _XML.match(content_type):
        return close_xml(body)
    return body


def content_type_of(headers) -> bytes:
    """The Content-Type value of (name, value) header pairs; empty when
    there is none or more than one (ambiguous: nothing is closed)."""
    found = [value for name, value in headers if name.lower() == b"content-type"]
    return found[0] if len(found) == 1 else b""


# -- multipart ---------------------------------------------------------------

def close_multipart(body: bytes, boundary: bytes) -> bytes:
    delimiter = b"--" + boundary
    at = _last_delimiter(body, delimiter)
    if at < 0:
        return body   # cut before the first part started: nothing to inspect
    rest = body[at + len(delimiter):]
    if rest.startswith(b"--"):
        return body   # the final boundary is there already
    closing = delimiter + b"--\r\n"
    if b"\n" not in rest:
        # Cut inside the delimiter line itself: end the body before it (its
        # CRLF, kept, ends the previous part).
        return body[:at] + closing
    if b"\r\n\r\n" in rest or b"\n\n" in rest:
        # Cut inside a part's content: end the part, then the body.
        return body + b"\r\n" + closing
    # Cut inside a part's headers: end them (an incomplete header line is
    # then parsed as it is, and may be refused as malformed), then the body.
    ending = b"" if body.endswith(b"\n") else b"\r\n"
    return body + ending + b"\r\n\r\n" + closing


def _last_delimiter(body: bytes, delimiter: bytes) -> int:
    """Offset of the last delimiter that starts a line, or -1."""
    end = len(body)
    while True:
        at = body.rfind(delimiter, 0, end)
        if at <= 0 or body[at - 1:at] == b"\n":
            return at
        end = at + len(delimiter) - 1


# -- JSON ----------------------------------------------------------------------

# One token at a time: a whole string, a punctuation mark, or a scalar
# (number or literal; its validity is the engine's business).
_TOKEN = re.compile(rb'[ \t\r\n]*(?:("[^"\\]*(?:\\.[^"\\]*)*")|([{}\[\]:,])|([^ \t\r\n{}\[\]:,"]+))', re.S)
_SPACE = re.compile(rb"[ \t\r\n]*")
# Expectations inside a container.
KEY_OR_END, KEY, COLON, VALUE, VALUE_OR_END, NEXT = range(6)
_CLOSING = {  # what ends a container left in each expectation
    ("{", KEY_OR_END): b"}", ("{", KEY): b'"":null}', ("{", COLON): b":null}", ("{", VALUE): b"null}",
    ("{", NEXT): b"}", ("[", VALUE_OR_END): b"]", ("[", VALUE): b"null]", ("[", NEXT): b"]",
}


def close_json(body: bytes) -> bytes:
    stack: list[list] = []       # [opener, expectation] per open container
    top_done = False
    pos, end = 0, len(body)
    kept = end                   # where the closing goes (a cut scalar is dropped)
    partial = b""                # an unterminated string at the cut
    while True:
        m = _TOKEN.match(body, pos)
        if m is None:
            tail = body[_SPACE.match(body, pos).end():]
            if not tail:
                break
            if tail[:1] != b'"':
                return body      # not JSON as we know it: the engine decides
            partial = _trim_string(tail)
            kept = end - len(tail)
            break
        string, mark, scalar = m.group(1), m.group(2), m.group(3)
        pos = m.end()
        frame = stack[-1] if stack else None
        if mark in (b"}", b"]"):
            if frame is None or (frame[0] == "{") != (mark == b"}") or frame[1] not in (
                    (KEY_OR_END, NEXT) if mark == b"}" else (VALUE_OR_END, NEXT)):
                return body
            stack.pop()
            top_done = top_done or not stack
            continue
        if mark == b":":
            if frame is None or frame[1] != COLON:
                return body
            frame[1] = VALUE
            continue
        if mark == b",":
            if frame is None or frame[1] != NEXT:
                return body
            frame[1] = KEY if frame[0] == "{" else VALUE
            continue
        # A string, a scalar or an opening bracket: a key or a value.
        if frame is None:
            if top_done:
                return body
        elif frame[0] == "{" and frame[1] in (KEY_OR_END, KEY):
            if string is None:
                return body
            frame[1] = COLON
            continue
        elif frame[1] not in (VALUE, VALUE_OR_END):
            return body
        if scalar is not None and pos == end:
            kept = m.start(3)     # may be cut ("tru", "12" of "123"): dropped
            break
        if frame is not None:
            frame[1] = NEXT
        if mark in (b"{", b"["):
            stack.append(["{" if mark == b"{" else "[", KEY_OR_END if mark == b"{" else VALUE_OR_END])
        elif frame is None:
            top_done = True
    if not stack:
        # Nothing open. A top-level string or scalar cut short stays as it
        # is: the engine's error then refuses it.
        return body
    suffix = []
    frame = stack[-1]
    if partial:
        if frame[0] == "{" and frame[1] in (KEY_OR_END, KEY):
            suffix.append(partial + b'":null')
        elif frame[1] in (VALUE, VALUE_OR_END):
            suffix.append(partial + b'"')
        else:
            return body
        frame[1] = NEXT
    # Outer containers wait for their next member (NEXT): only the innermost
    # may be left mid-member.
    for opener, expectation in reversed(stack):
        suffix.append(_CLOSING[(opener, expectation)])
    return body[:kept] + b"".join(suffix)


_CUT_ESCAPE = re.compile(rb"\\(?:u[0-9a-fA-F]{0,3})?$")


def _trim_string(tail: bytes) -> bytes:
    """An unterminated string, minus what cannot be kept: a half escape
    (an odd trailing backslash, part of \\uXXXX) and half a UTF-8 character."""
    m = _CUT_ESCAPE.search(tail)
    if m is not None:
        backslashes = len(tail[:m.start() + 1]) - len(tail[:m.start() + 1].rstrip(b"\\"))
        if backslashes % 2:      # an escape starts here, not an escaped backslash
            tail = tail[:m.start()]
    return _drop_partial_utf8(tail)


def _drop_partial_utf8(text: bytes) -> bytes:
    for back in range(1, min(4, len(text)) + 1):
        byte = text[-back]
        if byte < 0x80:
            return text
        if byte >= 0xC0:         # a lead byte: is its sequence complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return text if back >= need else text[:-back]
    return text


# -- XML -------------------------------------------------------------------------

# Bytes-level XML 1.0, for a UTF-8 (or ASCII-compatible) document: each
# complete construct, one at a time. Names allow any non-ASCII byte.
_NAME = rb"[A-Za-z_:\x80-\xff][-A-Za-z0-9_:.\x80-\xff]*"
_S = rb"[ \t\r\n]"
_ATTRIBUTE = _S + rb"+" + _NAME + _S + rb"*=" + _S + rb"*(?:\"[^<\"]*\"|'[^<']*')"
_XML_TOKEN = re.compile(
    rb"[^<&]+"                                                        # text
    rb"|&(?:#[0-9]+|#x[0-9a-fA-F]+|" + _NAME + rb");"                 # a reference
    rb"|<(?P<start>" + _NAME + rb")(?:" + _ATTRIBUTE + rb")*" + _S + rb"*(?P<empty>/?)>"
    rb"|</(?P<end>" + _NAME + rb")" + _S + rb"*>"
    rb"|<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>", re.S)
# A start tag cut short: its name, its complete attributes, then the rest.
_CUT_START = re.compile(rb"<(" + _NAME + rb")((?:" + _ATTRIBUTE + rb")*)(" + _S + rb"*)(.*)", re.S)
# What follows a cut start tag's complete attributes: one cut attribute,
# with its value (and its quote) when that has started.
_CUT_ATTRIBUTE = re.compile(rb"(" + _NAME + _S + rb"*=" + _S + rb"*(?:(\")[^<\"]*|(')[^<']*))"
                            rb"|" + _NAME + _S + rb"*(?:=" + _S + rb"*)?")
_CUT_END = re.compile(rb"</(" + _NAME + rb")?(" + _S + rb"*)")
_CUT_PI = re.compile(rb"<\?(" + _NAME + rb")" + _S, re.S)
_CUT_REFERENCE = re.compile(rb"&(?:#[0-9]*|#x[0-9a-fA-F]*|" + _NAME + rb")?\Z")
# The DOCTYPE, and inside its internal subset: strings, comments and PIs
# may hold ']' or '>'.
_DOCTYPE_PART = re.compile(rb"[^\"'\[>]+|\"[^\"]*\"|'[^']*'")
_SUBSET_PART = re.compile(rb"[^\"'<\]]+|\"[^\"]*\"|'[^']*'|<!--.*?-->|<\?.*?\?>|<", re.S)


def close_xml(body: bytes) -> bytes:
    """The document with the construct it was cut in ended (or dropped, if
    only a name was cut) and the elements still open closed; unchanged when
    whole, broken, or not closable (see the module's docstring)."""
    if body[:2] in (b"\xfe\xff", b"\xff\xfe") or b"\x00" in body[:4]:
        return body                  # UTF-16 or -32: not scanned here
    stack: list[bytes] = []          # names of the open elements
    opened = False                   # the root element has started
    pos, end = 0, len(body)
    match = _XML_TOKEN.match
    while pos < end:
        m = match(body, pos)
        if m is None:
            if body.startswith(b"<!DOCTYPE", pos) and not opened:
                pos = _doctype_end(body, pos)
                if pos < 0:
                    return body      # cut inside it
                continue
            break
        pos = m.end()
        kind = m.lastgroup
        if kind == "empty":          # a start tag
            if opened and not stack:
                return body          # a second root: broken already
            opened = True
            if not m.group("empty"):
                stack.append(m.group("start"))
        elif kind == "end":
            if not stack or stack.pop() != m.group("end"):
                return body
    if pos == end:                   # cut between constructs, or in text
        kept, tail = len(_drop_partial_utf8(body)), b""
    else:
        closing = _close_cut_construct(body[pos:], stack, opened)
        if closing is None:
            return body
        (tail, started), kept = closing, pos
        opened = opened or started   # the root's start tag was cut, and is ended
    if not opened:
        return body                  # cut before the root element: nothing to inspect
    closed = body[:kept] + tail + b"".join(b"</" + name + b">" for name in reversed(stack))
    return body if closed == body else closed


def _close_cut_construct(cut: bytes, stack: list[bytes], opened: bool) -> tuple[bytes, bool] | None:
    """What replaces the construct cut at the end (`cut`): itself ended
    where its content may carry an attack (a start tag's attribute value,
    a comment, CDATA, a processing instruction); nothing where only a name
    or a reference was cut. With it, whether it is a start tag (its element
    is pushed on `stack` unless empty). None when it cannot end a
    well-formed document (broken already, or a DOCTYPE)."""
    if cut.startswith(b"&"):
        return (b"", False) if _CUT_REFERENCE.match(cut) else None
    if cut.startswith(b"<!--"):
        comment = _drop_partial_utf8(cut)
        # "--" may not occur in a comment: a trailing "-" or "--" starts the end.
        return comment + (b">" if comment.endswith(b"--") and len(comment) > 5 else
                          b"->" if comment.endswith(b"-") and len(comment) > 4 else b"-->"), False
    if cut.startswith(b"<![CDATA["):
        return _drop_partial_utf8(cut) + b"]]>", False
    if b"<!--".startswith(cut) or b"<![CDATA[".startswith(cut):
        return b"", False
    if cut.startswith(b"<!"):
        return None                  # a DOCTYPE where it cannot be, or something else
    if cut.startswith(b"<?"):
        m = _CUT_PI.match(cut)
        if m is None:
            return b"", False        # only (part of) its target
        if m.group(1).lower() == b"xml":
            return None              # the declaration, not at the start
        pi = _drop_partial_utf8(cut)
        return pi + (b">" if pi.endswith(b"?") else b"?>"), False
    if cut.startswith(b"</"):
        m = _CUT_END.fullmatch(cut)
        if m is None or not stack:
            return None
        name = m.group(1) or b""
        if not (stack[-1] == name if m.group(2) else stack[-1].startswith(name)):
            return None
        return b"", False            # the open element is ended with the rest
    if cut == b"<":
        return b"", False
    m = _CUT_START.fullmatch(cut)
    if m is None or (opened and not stack):
        return None                  # not a start tag, or a second root
    name, attributes, space, rest = m.groups()
    if not attributes and not space and not rest:
        return b"", False            # cut inside the name
    if rest == b"/":
        return cut + b">", True
    tag = b"<" + name + attributes + space
    if rest:
        a = _CUT_ATTRIBUTE.fullmatch(rest)
        if a is None or not space:
            return None
        if a.group(1):               # its value, kept and ended
            value = a.group(1)
            reference = _CUT_REFERENCE.search(value)
            if reference is not None:
                value = value[:reference.start()]
            tag += _drop_partial_utf8(value) + (a.group(2) or a.group(3))
    stack.append(name)
    return tag + b">", True


def _doctype_end(body: bytes, pos: int) -> int:
    """Where the complete DOCTYPE at `pos` ends, or -1 if it is cut."""
    pos += len(b"<!DOCTYPE")
    end = len(body)
    while pos < end:
        if body[pos] == 0x3E:        # >
            return pos + 1
        if body[pos] == 0x5B:        # [ the internal subset
            pos += 1
            while pos < end and body[pos] != 0x5D:
                m = _SUBSET_PART.match(body, pos)
                if m is None:
                    return -1
                pos = m.end()
            pos += 1
            continue
        m = _DOCTYPE_PART.match(body, pos)
        if m is None:
            return -1
        pos = m.end()
    return -1
