"""The two rule sets every setup runs: CRS at paranoia level 1, and one
trivial rule (bench/rules/trivial.conf). Both are composed by wafsvc's own
compose(), and nginx loads the very same text, so every setup runs
identical rules on the same base engine configuration."""

from __future__ import annotations

import os
import pathlib

from wafsvc.rules import RuleSetSpec, compose

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRIVIAL_RULES = ROOT / "bench" / "rules" / "trivial.conf"
BASE_CONF = ROOT / "rules" / "modsecurity.conf"
SHARED_CRS = ROOT.parent.parent / "shared" / "crs" / "v4.28.0"  # /work/shared beside the checkouts
DEBIAN_CRS = pathlib.Path("/usr/share/modsecurity-crs")


def default_crs_dir() -> str:
    """CRS v4.28.0 from ../shared when present, else Debian's CRS."""
    for candidate in (os.environ.get("CRS_DIR", ""), str(SHARED_CRS), "/work/shared/crs/v4.28.0", str(DEBIAN_CRS)):
        if candidate and (pathlib.Path(candidate) / "rules").is_dir():
            return str(pathlib.Path(candidate).resolve())
    raise FileNotFoundError("no CRS found: set CRS_DIR")


def wafsvc_env(rules: str, crs_dir: str) -> dict[str, str]:
    """The wafsvc settings that produce `rule_specs(rules)`."""
    env = {"PARANOIA": "1", "MODE": "block", "WAF_BASE_CONF": str(BASE_CONF)}
    if rules == "crs":
        env["CRS_DIR"] = crs_dir or default_crs_dir()
    else:
        env["RULES"] = str(TRIVIAL_RULES)
    return env


def rule_specs(rules: str, crs_dir: str = "") -> dict[str, RuleSetSpec]:
    if rules == "crs":
        spec = RuleSetSpec(base_conf=str(BASE_CONF), crs_dir=crs_dir or default_crs_dir(), paranoia=1)
    else:
        spec = RuleSetSpec(base_conf=str(BASE_CONF), rules_file=str(TRIVIAL_RULES))
    return {"": spec}


def composed_text(rules: str, crs_dir: str = "") -> str:
    return compose(rule_specs(rules, crs_dir)[""])
