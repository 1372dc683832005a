"""XML bodies cut short, closed where they were cut (wafsvc/bodies.py):
well-formed again, keeping every byte that can carry an attack. What the
engine then makes of them is in test_large_bodies.py."""

from __future__ import annotations

import re
import xml.parsers.expat
from xml.sax.saxutils import escape

from hypothesis import given, settings
from hypothesis import strategies as st

from wafsvc.bodies import close_cut_body, close_xml

# A document with every construct, several of them holding ']', '>' or
# quotes where a naive scanner would stop.
RICH = ("<?xml version='1.0' encoding='utf-8'?>\n"
        "<!DOCTYPE r [<!ENTITY e \"x]>y\"> <!-- ] > --> <?p ]>?>]>\n"
        "<r a=\"1\" b='it\"s &amp; &#233;'><x>t\u00e9xt &amp; &e; &#233;&#x41;\u20ac\U0001F600</x>"
        "<!-- c - d \u00e9 --><![CDATA[ <cd> ]] ] \u00e9]]><?pi data \u00e9 ?>"
        "<y z=\"a&amp;b's>\"/><q:w xmlns:q='u' v = \"1\" >q</q:w ><empty/>\n</r>\n<!-- end -->\n").encode()
# What closing may drop: a cut name (of a tag, attribute, PI target or
# reference), the start of a markup, half a UTF-8 character.
DROPPABLE = re.compile(rb"(?:</?|<\?|<!-?|<!\[[CDAT]*\[?|&#?x?)?[-A-Za-z0-9_:.\x80-\xff]*"
                       rb"[ \t\r\n]*(?:=[ \t\r\n]*)?")


def well_formed(text: bytes) -> None:
    xml.parsers.expat.ParserCreate().Parse(text, True)


def check(text: bytes, cut: int, root_name_end: int) -> None:
    """`text` cut at `cut`, closed: unchanged while the root's name may be
    cut (nothing to inspect yet: the engine refuses it); then well-formed,
    the cut text kept but for what DROPPABLE allows."""
    closed = close_xml(text[:cut])
    if cut <= root_name_end:
        assert closed == text[:cut]
        return
    try:
        well_formed(closed)
    except xml.parsers.expat.ExpatError as exc:
        raise AssertionError(f"cut at {cut}: {text[:cut][-30:]!r} -> {closed[cut - 30:]!r}: {exc}") from None
    # Some end of what arrived, DROPPABLE, was dropped; the rest is kept.
    assert any(closed.startswith(text[:kept]) and DROPPABLE.fullmatch(text[kept:cut])
               for kept in range(cut, max(-1, cut - 40), -1)), (cut, text[cut - 20:cut], closed[cut - 20:])


def test_a_rich_document_cut_at_every_offset_closes_well_formed():
    well_formed(RICH)
    root_name_end = RICH.index(b"<r ") + 2
    for cut in range(1, len(RICH) + 1):
        check(RICH, cut, root_name_end)
    assert close_xml(RICH) == RICH


NAME = st.from_regex(r"[a-z_\u00e9][a-z0-9_.\u00e9-]{0,5}", fullmatch=True).filter(
    lambda name: not name.lower().startswith("xml"))
CHARS = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn"), whitelist_characters="\t\n"), max_size=12)


def attribute_value(text: str, quote: str) -> str:
    return quote + escape(text, {quote: "&quot;" if quote == '"' else "&apos;"}) + quote


@st.composite
def node(draw, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["text", "ref", "comment", "cdata", "pi"] + (["element"] * 3 if depth < 4 else [])))
    if kind == "text":
        return escape(draw(CHARS))
    if kind == "ref":
        return draw(st.sampled_from(["&amp;", "&lt;", "&#233;", "&#x20AC;", "&e;"]))
    if kind == "comment":
        return "<!--" + draw(CHARS.filter(lambda t: "--" not in t and not t.endswith("-"))) + "-->"
    if kind == "cdata":
        return "<![CDATA[" + draw(CHARS.filter(lambda t: "]]>" not in t)) + "]]>"
    if kind == "pi":
        return f"<?{draw(NAME)} " + draw(CHARS.filter(lambda t: "?>" not in t)) + "?>"
    return draw(element(depth + 1))


@st.composite
def element(draw, depth: int = 0) -> str:
    name = draw(NAME)
    names = draw(st.lists(NAME, max_size=3, unique=True))
    attributes = "".join(draw(st.sampled_from([" ", "  ", "\n"])) + a + "="
                         + attribute_value(draw(CHARS), draw(st.sampled_from(['"', "'"]))) for a in names)
    children = draw(st.lists(node(depth), max_size=4))
    if not children and draw(st.booleans()):
        return f"<{name}{attributes}/>"
    return f"<{name}{attributes}>" + "".join(children) + f"</{name}>"


@settings(max_examples=300, deadline=None)
@given(root=element(), declaration=st.booleans(), doctype=st.booleans(), data=st.data())
def test_any_cut_xml_document_closes_well_formed_keeping_what_arrived(root, declaration, doctype, data):
    prolog = ("<?xml version='1.0'?>\n" if declaration else "") + "<!-- prolog -->"
    prolog += "<!DOCTYPE d [<!ENTITY e \"v\">]>\n"     # declares &e; (used by "ref")
    if not doctype:
        prolog = prolog.replace("<!DOCTYPE d [<!ENTITY e \"v\">]>\n", "").replace("&e;", "")
        root = root.replace("&e;", "&amp;")
    text = (prolog + root + "\n").encode()
    well_formed(text)
    root_name_end = len(prolog.encode()) + 1 + len(re.match(r"<([^ \n/>]+)", root).group(1).encode())
    cut = data.draw(st.integers(min_value=1, max_value=len(text)))
    check(text, cut, root_name_end)


def test_what_closing_keeps_and_adds():
    assert close_xml(b"<a><b>1' or '1'='1") == b"<a><b>1' or '1'='1</b></a>"
    assert close_xml(b"<a><b q=\"1' or '1'='1") == b"<a><b q=\"1' or '1'='1\"></b></a>"
    assert close_xml(b"<a><![CDATA[1' or ]]") == b"<a><![CDATA[1' or ]]]]></a>"
    assert close_xml(b"<a><!-- x -") == b"<a><!-- x --></a>"
    assert close_xml(b"<a><?pi 1' or ?") == b"<a><?pi 1' or ?></a>"
    assert close_xml(b"<a>x &am") == b"<a>x </a>"
    assert close_xml(b"<a>x \xe2\x82") == b"<a>x </a>"
    assert close_xml(b"<a><b></") == b"<a><b></b></a>"
    assert close_xml(b"<a><b attr") == b"<a><b ></b></a>"
    assert close_xml(b"<a/><!-- after -") == b"<a/><!-- after -->"


def test_what_cannot_be_closed_is_left_for_the_engine_to_refuse():
    for broken in (
        b"<?xml version='1.0'?><!DOCTYPE a [<!ENTITY e \"v\">",   # cut in the internal subset
        b"<!DOCTYPE a [<!ENTITY e 'v'>]><a>&e;<!DOCTYPE",            # a DOCTYPE inside
        b"<?xml version='1.0'?><!-- before the root",               # nothing to inspect yet
        b"<a></b>",                                                 # broken already
        b"<a></a><b>x",                                             # a second root
        b"<a><b c='1'd",                                            # no space between attributes
        b"<a><b c='<",                                              # '<' in a value
        b"<a>x & y",                                                # a bare '&'
        b"<a><?xml version='1.0'",                                  # a declaration inside
        "<a>\u00e9".encode("utf-16"),                               # not scanned
        b"<a></a>",                                                 # whole: nothing to do
    ):
        assert close_xml(broken) == broken, broken


def test_xml_content_types_are_closed():
    for content_type in (b"application/xml", b"text/xml; charset=utf-8", b"application/soap+xml",
                         b"application/atom+xml"):
        assert close_cut_body(content_type, b"<a>x") == b"<a>x</a>", content_type
    assert close_cut_body(b"application/xml-dtd", b"<a>x") == b"<a>x"


def test_a_dense_buffer_of_elements_is_closed():
    body = b"<?xml version='1.0'?><doc>" + b"<item id=\"3\">text &amp; more</item>" * 5000 + b"</doc>"
    closed = close_xml(body[:64000])
    assert closed.startswith(body[:64000 - 40]) and closed.endswith(b"</doc>")
    well_formed(closed)
