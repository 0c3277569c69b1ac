"""Text handling shared by the coordinator core and the gRPC frontend: incremental
detokenization and stop-string matching. Imports nothing else from the project."""
