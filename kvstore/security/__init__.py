"""Transport security: the cluster's certificates (`certs`) and gRPC TLS credentials and peer
identity (`tls`). Authentication of users, RBAC, audit and quotas are not part of it yet."""
