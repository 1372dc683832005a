"""The configuration reference of both services and the Python client, as
Markdown tables built from the option tables:
    python -m common            print the tables
    python -m common --write    regenerate docs/configuration.md
docs/configuration.md is `document()`; a unit test keeps it current."""

import pathlib
import sys

from common.options import markdown_table
from gateway.config import OPTIONS as GATEWAY_OPTIONS
from modsec_spoa_client.config import ENVIRONMENT as CLIENT_OPTIONS
from wafsvc.config import OPTIONS as WAFSVC_OPTIONS

ROOT = str(pathlib.Path(__file__).resolve().parent.parent) + "/"
DOCUMENT = pathlib.Path(ROOT) / "docs" / "configuration.md"

INTRO = """\
# Configuration reference

Each setting is a flag or an environment variable (flags win). This page is
generated from the code (`python -m common --write`) and a test keeps it
current: edit the option tables (`wafsvc/config.py`, `gateway/config.py`,
`modsec_spoa_client/config.py`), not this file. Settings marked (app) are
what every application of an applications file starts from
([Several sites](../README.md#several-sites), [rules.md](rules.md)).
"""


def reference() -> str:
    text = "\n".join(["## wafsvc", "", markdown_table(WAFSVC_OPTIONS), "",
                      "## gateway", "", markdown_table(GATEWAY_OPTIONS), "",
                      "## Python client and `modsec-spoa` (environment only; the CLI's flags have the same names)",
                      "", markdown_table(CLIENT_OPTIONS)])
    return text.replace(ROOT, "")  # paths inside the checkout, shown relative


def document() -> str:
    return INTRO + "\n" + reference() + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOCUMENT.write_text(document())
    elif sys.argv[1:]:
        print("usage: python -m common [--write]", file=sys.stderr)
        sys.exit(2)
    else:
        print(reference())
