"""Prints the configuration reference of both services as Markdown tables:
    python -m common
The README's configuration section is this output."""

import pathlib

from common.options import markdown_table
from gateway.config import OPTIONS as GATEWAY_OPTIONS
from wafsvc.config import OPTIONS as WAFSVC_OPTIONS

ROOT = str(pathlib.Path(__file__).resolve().parent.parent) + "/"


def reference() -> str:
    text = "\n".join(["#### wafsvc", "", markdown_table(WAFSVC_OPTIONS), "",
                      "#### gateway", "", markdown_table(GATEWAY_OPTIONS)])
    return text.replace(ROOT, "")  # paths inside the checkout, shown relative


if __name__ == "__main__":
    print(reference())
