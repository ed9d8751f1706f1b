"""Security: the cluster's certificates (`certs`), gRPC TLS credentials and peer identity
(`tls`), and authentication / RBAC (`authstate`, `passwords`, `tokens`, `rbac`, `identity`,
`guard`). `identity.identity_of_call(context)` is the authenticated identity of an RPC."""
