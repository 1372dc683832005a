"""CRS conformance: runs the OWASP CRS regression tests (go-ftw YAML) through
the whole stack (HAProxy -> gateway -> gRPC -> wafsvc) and straight into the
engine in-process, and compares both. `make conformance` is the entry point.
"""
