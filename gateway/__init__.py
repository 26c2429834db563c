"""The online side: avatar store, frame pipeline, Triton client, gRPC service, aiohttp app."""
