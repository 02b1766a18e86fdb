#!/usr/bin/env python3
"""Keel's consumer groups from another toolchain: a group member written against the generated
gRPC client alone (no Rust, no Keel library) — it creates a topic, produces, joins a group with
Heartbeat, follows NOT_COORDINATOR hints, heartbeats until it has an assignment, fetches,
commits, reads its commit back with FetchOffsets, checks that a zombie commit is refused, and
leaves.

    pip install grpcio grpcio-tools
    keel dev &                                  # or any running cluster
    python3 tests/python/check_groups.py 127.0.0.1:9091

Refusals carry a google.rpc.Status in the `grpc-status-details-bin` trailer whose details hold a
google.rpc.ErrorInfo (reason, and for NOT_COORDINATOR the coordinator's address). grpcio-status
(which would decode it) is often not installed and grpcio-tools ships no google/rpc protos, so
this script writes the two messages it needs (field numbers as in googleapis'
google/rpc/status.proto and error_details.proto, hence the same bytes on the wire) next to the
generated code and decodes the trailer with them.
"""

import os
import sys
import tempfile
import time
import uuid

from check_api import open_channel  # TLS and the token, as keel dev prints them

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The subset of googleapis' google/rpc messages that Keel's refusals use. Package and field
# numbers match the originals, so `Any.Unpack` accepts "type.googleapis.com/google.rpc.ErrorInfo".
RPC_SUBSET = """
syntax = "proto3";
package google.rpc;
import "google/protobuf/any.proto";
message Status {
  int32 code = 1;
  string message = 2;
  repeated google.protobuf.Any details = 3;
}
message ErrorInfo {
  string reason = 1;
  string domain = 2;
  map<string, string> metadata = 3;
}
"""

# Every wait below is bounded by this many seconds.
PATIENCE = 30


def generate(out):
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    # A top-level module (rpc_subset_pb2), so it cannot shadow protobuf's own `google` package.
    os.makedirs(os.path.join(out, "rpc_subset"))
    with open(os.path.join(out, "rpc_subset", "rpc_subset.proto"), "w") as f:
        f.write(RPC_SUBSET)
    for proto_root, proto in [(f"{ROOT}/proto", "keel/v1/keel.proto"),
                              (os.path.join(out, "rpc_subset"), "rpc_subset.proto")]:
        args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                proto]
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed on {proto}")
    for d in ["keel", "keel/v1"]:
        open(os.path.join(out, d, "__init__.py"), "a").close()
    sys.path.insert(0, out)


class Refusal(Exception):
    """A gRPC error with its ErrorInfo decoded (reason is None when the status carries none)."""

    def __init__(self, error, reason, metadata):
        super().__init__(f"{error.code().name} {reason}: {error.details()}")
        self.code, self.reason, self.metadata, self.details = error.code(), reason, metadata, error.details()


def refusal(error):
    """Decodes the google.rpc.ErrorInfo of a failed call from its grpc-status-details-bin trailer."""
    import rpc_subset_pb2 as rpc_pb

    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        # grpcio hands `-bin` trailers over already base64-decoded.
        status = rpc_pb.Status.FromString(value)
        for detail in status.details:
            info = rpc_pb.ErrorInfo()
            if detail.Unpack(info):
                return Refusal(error, info.reason, dict(info.metadata))
    return Refusal(error, None, {})


class Cluster:
    """Channels per node address, opened on first use."""

    def __init__(self, grpc, rpc, bootstrap):
        self.grpc, self.rpc, self.bootstrap, self.channels = grpc, rpc, bootstrap, {}

    def stub(self, addr, kind):
        if addr not in self.channels:
            self.channels[addr] = open_channel(self.grpc, addr)
        return getattr(self.rpc, kind + "Stub")(self.channels[addr])


def find_coordinator(cluster, pb, group):
    deadline = time.monotonic() + PATIENCE
    while True:
        found = cluster.stub(cluster.bootstrap, "Groups").FindCoordinator(pb.FindCoordinatorRequest(group=group),
                                                                          timeout=10)
        if found.coordinator_addr:
            return found
        if time.monotonic() > deadline:
            sys.exit(f"group {group}: no coordinator after {PATIENCE} s")
        time.sleep(0.2)  # The __consumer_offsets partition is electing its leader.


class Member:
    """One member of a group, speaking Heartbeat itself: it keeps the member id it chose, and
    the epoch and assignment the coordinator granted."""

    def __init__(self, grpc, cluster, pb, group, topic, coordinator):
        self.grpc, self.cluster, self.pb, self.group, self.topic = grpc, cluster, pb, group, topic
        self.coordinator = coordinator
        # Chosen by the client once, so a retried join cannot create a second member.
        self.member_id = "py-" + uuid.uuid4().hex
        self.epoch = 0
        self.assignment = []  # [(topic, partition)]
        self.hints_followed = 0

    def call(self, method, request):
        """Calls the coordinator, following NOT_COORDINATOR hints and waiting out
        COORDINATOR_LOADING (both UNAVAILABLE: the call changed nothing)."""
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                return getattr(self.cluster.stub(self.coordinator, "Groups"), method)(request, timeout=10)
            except self.grpc.RpcError as e:
                r = refusal(e)
                if r.code != self.grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise r from None
                if r.reason == "NOT_COORDINATOR" and r.metadata.get("coordinator_addr"):
                    print(f"  {self.coordinator} is not the coordinator: following the hint to "
                          f"node {r.metadata.get('coordinator_id')} at {r.metadata['coordinator_addr']}")
                    self.coordinator = r.metadata["coordinator_addr"]
                    self.hints_followed += 1
                    continue
                if r.reason == "NOT_COORDINATOR":
                    self.coordinator = find_coordinator(self.cluster, self.pb, self.group).coordinator_addr
                time.sleep(0.2)

    def heartbeat(self, epoch=None):
        pb = self.pb
        owned = [pb.TopicPartitions(topic=t, partitions=[p for (tt, p) in self.assignment if tt == t])
                 for t in sorted({t for (t, _) in self.assignment})]
        request = pb.HeartbeatRequest(group=self.group, member_id=self.member_id,
                                      member_epoch=self.epoch if epoch is None else epoch,
                                      subscribed_topics=[self.topic], owned=owned, session_timeout_ms=10_000,
                                      client_id="check_groups.py")
        r = self.call("Heartbeat", request)
        self.epoch = r.member_epoch
        # A real member would stop consuming revoked partitions before reporting them gone;
        # this one only reads between heartbeats, so it may take the assignment as it comes.
        self.assignment = sorted((t.topic, p) for t in r.assignment for p in t.partitions)
        return r


def produce(grpc, cluster, pb, topic, partitions, per_partition):
    sent = {}
    producer = cluster.stub(cluster.bootstrap, "Producer")
    for p in range(partitions):
        values = [f"{topic}-{p}-{i}".encode() for i in range(per_partition)]
        request = pb.ProduceRequest(topic=topic, partition=p, producer_id=-1,
                                    records=[pb.Record(value=v) for v in values])
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                r = producer.Produce(request, timeout=15)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # The partition is still electing its first leader.
        sent[p] = (r.base_offset, values)
    return sent


def main():
    addr = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9091"
    with tempfile.TemporaryDirectory() as out:
        generate(out)
        import grpc
        from keel.v1 import keel_pb2 as pb, keel_pb2_grpc as rpc

        cluster = Cluster(grpc, rpc, addr)
        admin = cluster.stub(addr, "Admin")
        topic = "py-groups-" + uuid.uuid4().hex[:8]
        group = "py-group-" + uuid.uuid4().hex[:8]
        admin.CreateTopic(pb.CreateTopicRequest(name=topic, partitions=2, replication_factor=0), timeout=30)
        sent = produce(grpc, cluster, pb, topic, 2, 10)
        print(f"created {topic} and produced 10 records to each of its 2 partitions")

        found = find_coordinator(cluster, pb, group)
        print(f"group {group}: partition {found.partition} of __consumer_offsets, coordinator node "
              f"{found.coordinator_id} at {found.coordinator_addr}")
        # Start at a node that is NOT the coordinator, to exercise the NOT_COORDINATOR hint.
        nodes = admin.DescribeCluster(pb.DescribeClusterRequest(), timeout=10).nodes
        elsewhere = [n.addr for n in nodes if n.addr != found.coordinator_addr]
        member = Member(grpc, cluster, pb, group, topic, elsewhere[0] if elsewhere else found.coordinator_addr)

        # Join with epoch 0, then heartbeat at the epoch granted until the assignment arrives.
        r = member.heartbeat()
        print(f"joined as {member.member_id}: epoch {r.member_epoch}, heartbeat every {r.heartbeat_interval_ms} ms")
        deadline = time.monotonic() + PATIENCE
        while len(member.assignment) < 2:
            if time.monotonic() > deadline:
                sys.exit(f"no full assignment after {PATIENCE} s: {member.assignment}")
            time.sleep(r.heartbeat_interval_ms / 1000)
            r = member.heartbeat()
        if elsewhere:
            assert member.hints_followed >= 1, "the first node was not the coordinator, yet no hint was followed"
        print(f"assigned {member.assignment} at epoch {member.epoch}")

        # Fetch what was assigned, starting at the committed offsets (none yet: the log start).
        committed = member.call("FetchOffsets", pb.FetchOffsetsRequest(group=group)).offsets
        assert not committed, f"a new group has committed offsets: {committed}"
        consumer = cluster.stub(addr, "Consumer")
        positions = {}
        for (t, p) in member.assignment:
            f = consumer.Fetch(pb.FetchRequest(topic=t, partition=p, offset=0, max_wait_ms=500), timeout=15)
            base, values = sent[p]
            got = [rec.value for rec in f.records]
            assert got[base:base + len(values)] == values, (p, got, values)
            positions[(t, p)] = f.next_offset
        print(f"fetched {sum(positions.values())} records; positions {positions}")

        # Commit after processing: the next offset to read, for each owned partition.
        offsets = [pb.OffsetCommit(topic=t, partition=p, offset=o) for (t, p), o in sorted(positions.items())]
        r = member.call("CommitOffsets", pb.CommitOffsetsRequest(group=group, member_id=member.member_id,
                                                                   member_epoch=member.epoch, offsets=offsets))
        assert {(o.topic, o.partition): o.offset for o in r.offsets} == positions, r
        fetched = member.call("FetchOffsets", pb.FetchOffsetsRequest(group=group)).offsets
        assert {(o.topic, o.partition): o.offset for o in fetched} == positions, fetched
        print(f"committed, and FetchOffsets reads the commit back: {positions}")

        # A commit at an epoch the member never had is refused, with a reason, and changes nothing.
        try:
            member.call("CommitOffsets", pb.CommitOffsetsRequest(group=group, member_id=member.member_id,
                                                                   member_epoch=member.epoch + 100, offsets=offsets))
            sys.exit("a commit at a future epoch was accepted")
        except Refusal as e:
            assert e.reason == "FENCED_MEMBER_EPOCH", e
            print(f"commit at epoch {member.epoch + 100} refused: {e.reason} ({e.code.name})")

        # Leave (epoch -1): the group is empty at once, and the offsets stay. (keel.proto says the
        # answer's epoch is 0 after a leave; the coordinator answers -1, as Kafka's KIP-848 does.)
        last_epoch = member.epoch
        r = member.heartbeat(epoch=-1)
        assert r.member_epoch in (-1, 0) and not r.assignment, r
        described = member.call("DescribeGroup", pb.DescribeGroupRequest(group=group))
        assert not described.members and described.state == "empty", described
        assert described.total_lag_records == 0, described
        print(f"left; the group is {described.state} with total lag {described.total_lag_records}")

        # The member is gone: its commits are refused as from an unknown member.
        try:
            member.call("CommitOffsets", pb.CommitOffsetsRequest(group=group, member_id=member.member_id,
                                                                   member_epoch=last_epoch, offsets=offsets))
            sys.exit("a commit from a member that left was accepted")
        except Refusal as e:
            assert e.reason == "UNKNOWN_MEMBER_ID", e
            print(f"commit after leaving refused: {e.reason} ({e.code.name})")

        member.call("DeleteGroup", pb.DeleteGroupRequest(group=group))
        admin.DeleteTopic(pb.DeleteTopicRequest(name=topic), timeout=30)
        print("OK")


if __name__ == "__main__":
    main()
