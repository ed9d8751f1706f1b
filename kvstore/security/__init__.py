"""Security: the cluster's certificates (`certs`), gRPC TLS credentials and peer identity (`tls`),
and the MAC-chained audit log (`audit`). Authentication of users, RBAC and quotas are not part of
it yet."""
