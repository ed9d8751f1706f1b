"""One kvstore node: the multi-raft host, its gRPC services and the asyncio driver around them."""
