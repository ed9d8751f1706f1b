"""Generated code for the etcd v3 API subset in etcd.proto (bench/gen_proto.sh)."""
