"""The esans-sampler service: gRPC and HTTP transports around one sampling use case."""
