//! Every shipped scenario over fixed seeds: all checkers pass, and a seed
//! replays exactly.

use ocmesh_sim::{Replica, Scenario, Sim, check, run};

fn scenario(name: &str) -> Scenario {
    let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn all_seeds_pass(name: &str, seeds: std::ops::Range<u64>) {
    let s = scenario(name);
    for seed in seeds {
        let r = run(&s, seed);
        assert!(
            r.ok,
            "replay with: ocmesh sim simulations/scenarios/{name}.toml --seed {seed}\n{r}"
        );
        assert!(r.writes > 0 && r.changes_sent > 0, "{r}");
    }
}

#[test]
fn two_sites() {
    all_seeds_pass("two-sites", 0..20);
}

#[test]
fn chain() {
    all_seeds_pass("chain", 0..20);
}

#[test]
fn hub() {
    all_seeds_pass("hub", 0..10);
}

#[test]
fn region_split() {
    all_seeds_pass("region-split", 0..3);
}

#[test]
fn week_away() {
    all_seeds_pass("week-away", 0..5);
}

#[test]
fn a_seed_replays_exactly() {
    let s = scenario("hub");
    assert_eq!(run(&s, 42), run(&s, 42));
    assert_ne!(
        run(&s, 42).events,
        run(&s, 43).events,
        "different seeds, different runs"
    );
}

#[test]
fn checkers_catch_a_lost_version() {
    let s = scenario("two-sites");
    let (report, mut replicas) = Sim::new(&s, 7).run();
    assert!(report.ok, "{report}");
    let id = replicas[1].documents().next().map(str::to_owned).expect("a document");
    assert!(replicas[1].corrupt_drop_version(&id));
    let mut anomalies = Vec::new();
    check(&replicas, &[], &mut anomalies);
    assert!(anomalies.iter().any(|a| a.contains("digest")), "{anomalies:?}");
}

#[test]
fn checkers_catch_a_lost_acknowledged_write() {
    let mut a = Replica::new("a");
    let b = Replica::new("b");
    let c = a.write("000000000000000000000001", b"{}", false, 10);
    let mut anomalies = Vec::new();
    check(&[a, b], &[(c.origin, c.seq)], &mut anomalies);
    assert!(anomalies.iter().any(|x| x.contains("acknowledged")), "{anomalies:?}");
}

#[test]
fn malformed_scenarios_are_refused_with_a_reason() {
    let e = Scenario::from_toml("name = 1").expect_err("bad type");
    assert!(e.to_string().contains("parse"), "{e}");
    let text = r#"
        name = "x"
        workload_ms = 10
        max_ms = 100
        [[sites]]
        name = "a"
        write_interval_ms = [1, 2]
        [[links]]
        a = "a"
        b = "nowhere"
        latency_ms = [1, 2]
    "#;
    let e = Scenario::from_toml(text).expect_err("unknown site");
    assert!(e.to_string().contains("nowhere"), "{e}");
}
