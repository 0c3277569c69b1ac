"""lightllm-grpc: a gRPC-native LLM inference server."""

__version__ = "0.1.0"
