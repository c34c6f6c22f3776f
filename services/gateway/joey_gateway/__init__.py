"""The synchronous inference endpoint: Open Inference Protocol (KServe V2) over gRPC and REST."""
