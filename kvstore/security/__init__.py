"""Security: the cluster's certificates (`certs`), gRPC TLS credentials and peer identity (`tls`),
the MAC-chained audit log (`audit`), and authentication / RBAC (`authstate`, `passwords`,
`tokens`, `rbac`, `identity`, `guard`). `identity.identity_of_call(context)` is the
authenticated identity of an RPC."""
