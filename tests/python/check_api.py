#!/usr/bin/env python3
"""Keel's public API from another toolchain: generates a Python gRPC client from proto/ with
grpcio-tools and creates a topic, produces and consumes against a running cluster — no Rust.

    pip install grpcio grpcio-tools
    keel dev &                                  # or any running cluster
    export KEEL_CA_FILE=… KEEL_TOKEN=…          # as keel dev prints them (TLS and a token)
    python3 tests/python/check_api.py 127.0.0.1:9091
"""

import os
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def open_channel(grpc, addr):
    """A channel to `addr`: TLS trusting KEEL_CA_FILE when it is set (as `keel dev` prints it),
    with KEEL_TOKEN as the bearer token of every call; plaintext otherwise."""
    ca_file, token = os.environ.get("KEEL_CA_FILE"), os.environ.get("KEEL_TOKEN")
    if not ca_file:
        return grpc.insecure_channel(addr)
    with open(ca_file, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(addr, credentials)


def generate(out):
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{ROOT}/proto", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
            "keel/v1/keel.proto"]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for d in ["keel", "keel/v1"]:
        open(os.path.join(out, d, "__init__.py"), "a").close()
    sys.path.insert(0, out)


def main():
    addr = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9091"
    with tempfile.TemporaryDirectory() as out:
        generate(out)
        import grpc
        from keel.v1 import keel_pb2 as pb, keel_pb2_grpc as rpc

        channel = open_channel(grpc, addr)
        admin, producer, consumer = rpc.AdminStub(channel), rpc.ProducerStub(channel), rpc.ConsumerStub(channel)
        topic = "py-" + uuid.uuid4().hex[:8]
        created = admin.CreateTopic(pb.CreateTopicRequest(name=topic, partitions=2, replication_factor=0), timeout=30)
        print(f"created {topic}: {len(created.topic.partitions)} partitions, rf {created.topic.replication_factor}")

        # A bad request gets a clear status.
        try:
            admin.CreateTopic(pb.CreateTopicRequest(name="", partitions=1), timeout=10)
            sys.exit("an empty topic name was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            print(f"empty name refused: {e.code().name}: {e.details()}")

        sent = []
        for i in range(20):
            values = [f"value-{i}-{j}".encode() for j in range(5)]
            request = pb.ProduceRequest(topic=topic, partition=i % 2, request_id=i, producer_id=-1,
                                        records=[pb.Record(key=b"k", value=v) for v in values])
            for attempt in range(50):
                try:
                    r = producer.Produce(request, timeout=15)
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == 49:
                        raise
                    time.sleep(0.1)  # The partition is still electing its first leader.
            sent += [(i % 2, r.base_offset + j, v) for j, v in enumerate(values)]
        print(f"produced {len(sent)} records")

        got = {}
        for partition in (0, 1):
            offset = 0
            while True:
                r = consumer.Fetch(pb.FetchRequest(topic=topic, partition=partition, offset=offset, max_wait_ms=200),
                                   timeout=15)
                if not r.records:
                    break
                for rec in r.records:
                    got[(partition, rec.offset)] = rec.value
                offset = r.next_offset
        for partition, offset, value in sent:
            assert got.get((partition, offset)) == value, (partition, offset, value, got.get((partition, offset)))
        print(f"consumed {len(got)} records; every acknowledged record is at its offset")

        # An idempotent producer by hand: an id from any node, the producer fields set on the
        # request. A duplicate request gets the first one's offsets and writes nothing; a gap is
        # refused with OUT_OF_ORDER_SEQUENCE.
        ident = producer.InitProducerId(pb.InitProducerIdRequest(), timeout=15)
        stamped = lambda seq, values: pb.ProduceRequest(
            topic=topic, partition=0, producer_id=ident.producer_id, producer_epoch=ident.producer_epoch,
            base_sequence=seq, records=[pb.Record(value=v) for v in values])
        first = producer.Produce(stamped(0, [b"once-a", b"once-b"]), timeout=15)
        again = producer.Produce(stamped(0, [b"once-a", b"once-b"]), timeout=15)
        assert (again.base_offset, again.record_count) == (first.base_offset, 2), (first, again)
        try:
            producer.Produce(stamped(7, [b"after-a-gap"]), timeout=15)
            sys.exit("a sequence gap was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
        r = consumer.Fetch(pb.FetchRequest(topic=topic, partition=0, offset=first.base_offset, max_wait_ms=200),
                           timeout=15)
        values = [rec.value for rec in r.records]
        assert values == [b"once-a", b"once-b"], values
        print(f"producer {ident.producer_id}: a duplicate request got offset {again.base_offset} again; a gap was "
              "refused")

        cluster = admin.DescribeCluster(pb.DescribeClusterRequest(), timeout=10)
        print(f"cluster {cluster.cluster_id}: {len(cluster.nodes)} nodes, controller leader {cluster.controller_leader}")
        admin.DeleteTopic(pb.DeleteTopicRequest(name=topic), timeout=30)
        print("OK")


if __name__ == "__main__":
    main()
