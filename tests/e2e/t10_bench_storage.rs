//! End to end: the real `keel` binary writes a log on the real disk; the log it leaves behind is
//! reopened from the files alone and holds exactly what the run reported.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic: that is how they fail.

use std::process::Command;
use std::sync::Arc;

use keel_storage::{Disk, FileDisk, LogConfig, SegmentLog};

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

#[test]
fn bench_storage_writes_a_durable_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bench-0");
    let out = keel()
        .args(["bench", "storage", "--records", "3000", "--batch", "16", "--segment-mib", "1", "--output", "json"])
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "keel failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = report["records"].as_u64().unwrap();
    assert!(records >= 3000 && records.is_multiple_of(16), "{report}");
    assert_eq!(report["end_offset"].as_u64(), Some(records));
    for key in ["records_per_sec", "mib_per_sec", "latency_us_p50", "latency_us_p99", "latency_us_p999"] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key} missing in {report}");
    }

    let config = LogConfig { segment_bytes_max: 1 << 20, ..LogConfig::default() };
    let log = SegmentLog::open(Arc::new(FileDisk::new()) as Arc<dyn Disk>, &dir, config).unwrap();
    assert_eq!(log.written().offset, records, "every reported record is on disk");
    assert!(log.segment_count() > 1, "3,000 KiB of records roll 1 MiB segments");
    let mut next = 0;
    while next < records {
        for batch in log.read(next, 1 << 20, u64::MAX).unwrap() {
            batch.validate_records().unwrap();
            assert_eq!(batch.header().base_offset, next);
            next = batch.header().next_offset();
        }
    }
}

#[test]
fn bad_arguments_fail_clearly() {
    for args in [&["bench", "storage", "--batch", "0"][..], &["bench", "storage", "--segment-mib", "0"]] {
        let out = keel().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error: --"), "{args:?}: unclear message: {stderr}");
    }
    let out = keel()
        .args(["bench", "storage", "--records", "16", "--batch", "100000", "--value-bytes", "1024"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than the largest batch"));
}
