"""Generated gRPC stubs for proto/waf/v1/waf.proto (regenerate: python -m wafapi.codegen).

Import the modules directly: `from wafapi import waf_pb2, waf_pb2_grpc`.
"""
