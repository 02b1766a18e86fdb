#!/usr/bin/env python3
"""Keel's transactional messages from another toolchain: a producer written against the generated
gRPC client alone prepares two transactions, commits one and leaves the other without an END (as
a producer that crashed would), then answers the coordinator's check-back for it on the TxnChecks
stream; it checks that the committed records are readable, that a contradictory END is refused
with TXN_CONTRADICTS, and that nothing is left pending.

    pip install grpcio grpcio-tools
    keel dev &                                  # or any running cluster
    python3 tests/python/check_txn.py 127.0.0.1:9091

The check-back comes after the transaction's timeout (2 s here) once the stream is open on the
coordinator that FindCoordinator (kind COORDINATOR_TRANSACTIONS) names.
"""

import queue
import sys
import tempfile
import threading
import time
import uuid

from check_groups import PATIENCE, Cluster, generate, refusal


def main():
    bootstrap = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9091"
    import grpc

    with tempfile.TemporaryDirectory() as out:
        generate(out)
        from keel.v1 import keel_pb2 as pb
        from keel.v1 import keel_pb2_grpc as rpc

        cluster = Cluster(grpc, rpc, bootstrap)
        run = uuid.uuid4().hex[:8]
        topic, group = f"py-txn-{run}", f"py-payments-{run}"
        cluster.stub(bootstrap, "Admin").CreateTopic(
            pb.CreateTopicRequest(name=topic, partitions=1, replication_factor=0), timeout=30)
        producer = cluster.stub(bootstrap, "Producer")

        def prepare(txn, value):
            records = [pb.TxnPartitionRecords(topic=topic, partition=0, records=[pb.Record(value=value)])]
            deadline = time.monotonic() + PATIENCE
            while True:
                try:
                    return producer.PrepareTxn(pb.PrepareTxnRequest(group=group, transaction_id=txn, records=records,
                                                                    timeout_ms=2000), timeout=10)
                except grpc.RpcError as e:
                    # UNAVAILABLE: the topic or __txn is still electing leaders; a retried
                    # prepare with the same records is answered, not repeated.
                    if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

        prepare("ended", b"committed by END")
        prepare("crashed", b"committed by check-back")
        status = producer.EndTxn(pb.EndTxnRequest(group=group, transaction_id="ended", commit=True), timeout=10)
        assert status.state == pb.TXN_COMMITTED, status
        try:
            producer.EndTxn(pb.EndTxnRequest(group=group, transaction_id="ended", commit=False), timeout=10)
            sys.exit("a rollback of a committed transaction was accepted")
        except grpc.RpcError as e:
            r = refusal(e)
            assert r.code == grpc.StatusCode.FAILED_PRECONDITION and r.reason == "TXN_CONTRADICTS", r

        # The check-back stream, on the coordinator of the group's __txn partition.
        found = cluster.stub(bootstrap, "Groups").FindCoordinator(
            pb.FindCoordinatorRequest(group=group, kind=pb.COORDINATOR_TRANSACTIONS), timeout=10)
        assert found.coordinator_addr, found
        answers = queue.Queue()
        answers.put(pb.TxnCheckAnswer(group=group))

        def outgoing():
            while True:
                item = answers.get()
                if item is None:
                    return
                yield item

        checks = cluster.stub(found.coordinator_addr, "Producer").TxnChecks(outgoing(), timeout=PATIENCE)
        asked = []

        def answer():
            try:
                for check in checks:
                    if not check.transaction_id:
                        continue  # a keepalive
                    asked.append(check.transaction_id)
                    answers.put(pb.TxnCheckAnswer(group=group, transaction_id=check.transaction_id,
                                                  outcome=pb.TXN_COMMIT))
            except grpc.RpcError:
                pass  # cancelled below

        reader = threading.Thread(target=answer, daemon=True)
        reader.start()

        admin = cluster.stub(bootstrap, "Admin")
        deadline = time.monotonic() + PATIENCE
        while True:
            listed = admin.ListTxns(pb.ListTxnsRequest(group=group, include_ended=True), timeout=10)
            states = {t.transaction_id: t.state for t in listed.transactions}
            if states.get("crashed") == pb.TXN_COMMITTED:
                break
            if time.monotonic() > deadline:
                sys.exit(f"the check-back did not commit 'crashed': {listed}")
            time.sleep(0.3)
        checks.cancel()
        answers.put(None)
        assert "crashed" in asked and "ended" not in asked, asked
        pending = admin.ListTxns(pb.ListTxnsRequest(group=group), timeout=10)
        assert not pending.transactions, pending

        consumer = cluster.stub(bootstrap, "Consumer")
        values, offset, deadline = [], 0, time.monotonic() + PATIENCE
        while len(values) < 2 and time.monotonic() < deadline:
            fetched = consumer.Fetch(pb.FetchRequest(topic=topic, partition=0, offset=offset, max_bytes=1 << 20,
                                                     max_wait_ms=500, format=pb.FETCH_FORMAT_RECORDS), timeout=10)
            for r in fetched.records:
                assert any(h.key == "keel-txn-id" for h in r.headers), r
                values.append(r.value)
                offset = r.offset + 1
        assert sorted(values) == [b"committed by END", b"committed by check-back"], values
        print(f"transactions OK: one committed by END, one by its check-back ({len(asked)} asked), "
              f"a contradictory END refused, nothing pending")


if __name__ == "__main__":
    main()
