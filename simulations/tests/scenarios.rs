//! Every shipped scenario over fixed seeds passes every checker, on the
//! node itself (a few seeds: debug builds are slow) and on the model (more
//! seeds); a seed replays exactly; and the checkers do fail when a replica
//! is damaged, a write or a work item goes wrong, or a topology cannot
//! converge.

use ocmesh_sim::{Backend, Journal, NodeSite, Replica, Scenario, Sim, check, check_nodes, run_on};

fn run(s: &Scenario, seed: u64) -> ocmesh_sim::Report {
    run_on(s, Backend::Model, seed)
}

fn scenario(name: &str) -> Scenario {
    let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn all_seeds_pass(name: &str, backend: Backend, seeds: std::ops::Range<u64>) {
    let s = scenario(name);
    let flag = if backend == Backend::Model {
        " --backend model"
    } else {
        ""
    };
    for seed in seeds {
        let r = run_on(&s, backend, seed);
        let replay = format!("replay with: ocmesh sim simulations/scenarios/{name}.toml{flag} --seed {seed}\n{r}");
        assert!(r.ok && r.converged, "{replay}");
        assert!(r.writes > 0 && r.changes_sent > 0, "nothing happened: {replay}");
        // Every shipped scenario cuts or flaps links, so sessions restart.
        assert!(r.connections > s.links.len() as u64, "no reconnection: {replay}");
        if backend == Backend::Node {
            assert!(
                r.workitems > 0 && r.completions >= r.workitems,
                "no work items done: {replay}"
            );
        }
    }
}

#[test]
fn two_sites() {
    all_seeds_pass("two-sites", Backend::Model, 0..20);
    all_seeds_pass("two-sites", Backend::Node, 0..3);
}

#[test]
fn chain() {
    all_seeds_pass("chain", Backend::Model, 0..20);
    all_seeds_pass("chain", Backend::Node, 0..1);
}

#[test]
fn hub() {
    all_seeds_pass("hub", Backend::Model, 0..20);
    // One node seed of hub or region-split takes about a minute in a debug
    // build: CI runs them in release (.ci/run).
}

#[test]
fn region_split() {
    all_seeds_pass("region-split", Backend::Model, 0..20);
}

#[test]
fn week_away() {
    all_seeds_pass("week-away", Backend::Model, 0..20);
    all_seeds_pass("week-away", Backend::Node, 0..1);
}

#[test]
fn a_seed_replays_exactly() {
    for name in ["two-sites", "chain", "hub"] {
        let s = scenario(name);
        assert_eq!(run(&s, 42), run(&s, 42), "{name}");
    }
    // On nodes too: same ids, same clocks, same digests.
    let s = scenario("two-sites");
    let (a, b) = (run_on(&s, Backend::Node, 42), run_on(&s, Backend::Node, 42));
    assert!(a.ok, "{a}");
    assert_eq!(a, b);
    assert_ne!(a.digests, run_on(&s, Backend::Node, 43).digests);
    let s = scenario("hub");
    assert_ne!(
        run(&s, 42).events,
        run(&s, 43).events,
        "different seeds, different runs"
    );
}

#[test]
fn checkers_catch_a_lost_version() {
    let s = scenario("two-sites");
    let (report, mut replicas) = Sim::<Replica>::new(&s, 7).run();
    assert!(report.ok, "{report}");
    let id = replicas[1].documents().next().map(str::to_owned).expect("a document");
    assert!(replicas[1].corrupt_drop_version(&id));
    let mut anomalies = Vec::new();
    check(&replicas, &[], &mut anomalies);
    assert!(anomalies.iter().any(|a| a.contains("digest")), "{anomalies:?}");
    assert!(anomalies.iter().any(|a| a.contains("lacks versions")), "{anomalies:?}");
}

/// A finished node run, checked again against journals that claim what
/// the nodes do not show.
#[test]
fn node_checkers_catch_lost_writes_and_work_item_faults() {
    let s = scenario("two-sites");
    let (report, sites) = Sim::<NodeSite>::new(&s, 5).run();
    assert!(report.ok, "{report}");
    let mut clean = Vec::new();
    check_nodes(&sites, &Journal::default(), &mut clean);
    assert!(clean.is_empty(), "{clean:?}");

    let mut j = Journal::default();
    j.acked.push(("a".into(), 1_000_000));
    let item = "0123456789abcdef01234567".to_owned();
    j.pushed.insert(item.clone());
    j.pops
        .entry((item.clone(), 1, "a".to_owned()))
        .or_default()
        .extend(["a".to_owned(), "b".to_owned()]);
    j.completions
        .entry(item.clone())
        .or_default()
        .extend([("a".to_owned(), 1), ("b".to_owned(), 1)]);
    let mut anomalies = Vec::new();
    check_nodes(&sites, &j, &mut anomalies);
    let has = |what: &str| anomalies.iter().any(|a| a.contains(what));
    assert!(has("acknowledged"), "{anomalies:?}");
    assert!(has("under one epoch"), "{anomalies:?}");
    assert!(has("no takeover recorded"), "{anomalies:?}");
    assert!(has("not completed"), "{anomalies:?}");
    // With a takeover recorded, two completions are allowed.
    j.takeovers.insert(item);
    let mut anomalies = Vec::new();
    check_nodes(&sites, &j, &mut anomalies);
    assert!(!anomalies.iter().any(|a| a.contains("no takeover")), "{anomalies:?}");
}

#[test]
fn checkers_catch_a_lost_acknowledged_write() {
    let mut a = Replica::new("a");
    let b = Replica::new("b");
    let c = a
        .write("000000000000000000000001", b"{}", false, 10)
        .expect("an insert");
    let mut anomalies = Vec::new();
    check(&[a, b], &[(c.origin, c.seq)], &mut anomalies);
    assert!(anomalies.iter().any(|x| x.contains("acknowledged")), "{anomalies:?}");
    assert!(anomalies.iter().any(|x| x.contains("current version")), "{anomalies:?}");
}

const UNLINKED: &str = r#"
    name = "unlinked"
    workload_ms = 1_000
    max_ms = 10_000
    links = []
    [[sites]]
    name = "a"
    write_interval_ms = [10, 20]
    [[sites]]
    name = "b"
    write_interval_ms = [10, 20]
"#;

#[test]
fn a_run_that_cannot_converge_fails() {
    let s = Scenario::from_toml(UNLINKED).expect("valid");
    for backend in [Backend::Model, Backend::Node] {
        let r = run_on(&s, backend, 1);
        assert!(!r.ok && !r.converged && r.convergence_ms.is_none(), "{r}");
        assert!(r.to_string().contains("FAILED"), "{r}");
        assert!(r.anomalies.iter().any(|a| a.contains("digest")), "{r}");
    }
}

#[test]
fn a_clock_beyond_the_drift_bound_is_counted_and_still_converges() {
    let text = r#"
        name = "skewed"
        workload_ms = 5_000
        max_ms = 120_000
        [[sites]]
        name = "a"
        clock_skew_ms = 120_000
        write_interval_ms = [50, 100]
        [[sites]]
        name = "b"
        write_interval_ms = [50, 100]
        [[links]]
        a = "a"
        b = "b"
        latency_ms = [1, 5]
    "#;
    let r = run_on(&Scenario::from_toml(text).expect("valid"), Backend::Model, 3);
    assert!(r.ok, "{r}");
    assert!(r.clock_clamped > 0, "{r}");
}

/// After a peer stamped a document beyond the drift bound, this site's
/// clock is clamped below that version, so a local write to the document
/// could not become current: the node refuses it with `ClockBehind`, a
/// clear error naming the document, the stamp and the site, until its clock
/// catches up. Nothing else is disturbed and the sites agree.
#[test]
fn on_nodes_a_clock_beyond_the_drift_bound_refuses_writes_to_its_documents_clearly() {
    let text = r#"
        name = "skewed"
        workload_ms = 5_000
        max_ms = 120_000
        workitem_ratio = 0.0
        takeover_ratio = 0.0
        [[sites]]
        name = "a"
        clock_skew_ms = 120_000
        write_interval_ms = [50, 100]
        [[sites]]
        name = "b"
        write_interval_ms = [50, 100]
        [[links]]
        a = "a"
        b = "b"
        latency_ms = [1, 5]
    "#;
    let r = run_on(&Scenario::from_toml(text).expect("valid"), Backend::Node, 3);
    assert!(r.clock_clamped > 0, "{r}");
    assert!(r.clock_refused > 0, "{r}");
    assert!(r.ok, "{r}");
    assert!(r.converged, "{r}");
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
    // Built by hand past the parser: the run reports it instead of guessing.
    let mut s = Scenario::from_toml(UNLINKED).expect("valid");
    s.delete_ratio = 2.0;
    let r = run_on(&s, Backend::Node, 0);
    assert!(!r.ok && r.events == 0, "{r}");
    assert!(r.anomalies[0].contains("invalid scenario"), "{r}");
}

/// Throughput figure: `cargo test --release -p ocmesh-sim --test scenarios -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn hub_events_per_second() {
    let s = scenario("hub");
    let started = std::time::Instant::now();
    let events: u64 = (0..20).map(|seed| run(&s, seed).events).sum();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "hub: 20 seeds, {events} events in {secs:.2} s: {:.0} events/s",
        events as f64 / secs
    );
}
