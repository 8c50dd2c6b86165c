//! `ocmesh bench workitems` runs end to end, against RabbitMQ too when a
//! broker is reachable (required where OCMESH_REQUIRE_AMQP=1).

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

const AMQP_ADDR: &str = "127.0.0.1:5672";

fn broker_reachable() -> bool {
    AMQP_ADDR
        .parse()
        .is_ok_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

#[test]
fn workitem_bench_runs() {
    let mut args = vec![
        "bench",
        "workitems",
        "--items",
        "300",
        "--workers",
        "4",
        "--depth",
        "3000",
    ];
    let against = format!("amqp://guest:guest@{AMQP_ADDR}/%2f");
    let with_amqp = cfg!(feature = "rabbitmq") && broker_reachable();
    if cfg!(feature = "rabbitmq") && !with_amqp {
        if std::env::var("OCMESH_REQUIRE_AMQP").as_deref() == Ok("1") {
            panic!("OCMESH_REQUIRE_AMQP=1 but no RabbitMQ broker answers on {AMQP_ADDR}");
        }
        eprintln!("skipping the RabbitMQ half: no broker answers on {AMQP_ADDR}");
    }
    if with_amqp {
        args.extend(["--against", against.as_str()]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ocmesh"))
        .args(&args)
        .output()
        .expect("run ocmesh bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("ocmesh:   300 items"), "{text}");
    assert!(text.contains("pop p50 with 3000 items queued"), "{text}");
    if with_amqp {
        assert!(text.contains("rabbitmq: 300 items") && text.contains("ratio"), "{text}");
    }
}

/// `ocmesh bench openiap` runs both halves (gRPC and direct) and prints
/// their rates, latencies and the overhead.
#[test]
fn openiap_bench_runs() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_ocmesh"))
        .args([
            "bench",
            "openiap",
            "--cycles",
            "120",
            "--clients",
            "4",
            "--payload",
            "64",
        ])
        .env("OCMESH_LOG", "warn")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for half in ["direct:", "grpc:"] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(half))
            .ok_or_else(|| anyhow::anyhow!("no {half} line in:\n{text}"))?;
        anyhow::ensure!(
            line.contains("120 cycles in") && line.contains("cycles/s") && line.contains("p50") && line.contains("p99"),
            "{line}"
        );
    }
    anyhow::ensure!(text.contains("overhead 1 - grpc/direct:"), "{text}");
    Ok(())
}

/// `ocmesh bench crosssite` sends items across a real two-site mesh and
/// prints their round-trip latency.
#[test]
fn crosssite_bench_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_ocmesh"))
        .args(["bench", "crosssite", "--items", "20", "--concurrency", "2"])
        .output()
        .expect("run ocmesh bench crosssite");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("20 items in") && text.contains("p99"), "{text}");
}
