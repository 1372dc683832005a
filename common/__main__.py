"""Prints the configuration reference of both services and the Python
client as Markdown tables:
    python -m common
The README's configuration section is this output."""

import pathlib

from common.options import markdown_table
from gateway.config import OPTIONS as GATEWAY_OPTIONS
from modsec_spoa_client.config import ENVIRONMENT as CLIENT_OPTIONS
from wafsvc.config import OPTIONS as WAFSVC_OPTIONS

ROOT = str(pathlib.Path(__file__).resolve().parent.parent) + "/"


def reference() -> str:
    text = "\n".join(["#### wafsvc", "", markdown_table(WAFSVC_OPTIONS), "",
                      "#### gateway", "", markdown_table(GATEWAY_OPTIONS), "",
                      "#### Python client and `modsec-spoa` (environment only; the CLI's flags have the same names)",
                      "", markdown_table(CLIENT_OPTIONS)])
    return text.replace(ROOT, "")  # paths inside the checkout, shown relative


if __name__ == "__main__":
    print(reference())
