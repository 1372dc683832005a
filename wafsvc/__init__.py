"""wafsvc: ModSecurity v3 evaluation service behind a gRPC API."""
