use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;

fn weights(w: &[(&str, f64)]) -> Arc<Weights> {
    Arc::new(Weights {
        by_tenant: w.iter().map(|(n, w)| (Arc::from(*n), *w)).collect(),
        default: 1.0,
    })
}

fn limits(running: usize) -> JobLimits {
    JobLimits {
        held_per_tenant: 100_000,
        running_per_tenant: running,
        running,
    }
}

#[test]
fn a_finished_job_never_moves_again() {
    use JobPhase::*;
    for end in [Done, Failed, Cancelled, Interrupted] {
        for next in [Queued, Running, Done, Failed, Cancelled, Interrupted] {
            assert!(!end.may_become(next), "{end:?} -> {next:?}");
        }
    }
    assert!(Queued.may_become(Running));
    assert!(Queued.may_become(Cancelled));
    assert!(Running.may_become(Queued));
    assert!(Running.may_become(Done));
}

#[test]
fn only_a_repeatable_job_runs_again_after_its_owner_stopped() {
    assert_eq!(recovery(JobPhase::Queued, false), Recovery::Requeue);
    assert_eq!(recovery(JobPhase::Running, true), Recovery::RunAgain);
    assert_eq!(recovery(JobPhase::Running, false), Recovery::Interrupt);
    assert_eq!(recovery(JobPhase::Done, true), Recovery::Keep);
    assert_eq!(recovery(JobPhase::Interrupted, true), Recovery::Keep);
}

#[test]
fn a_lease_is_taken_over_only_once_it_lapsed_and_fences_the_old_owner() {
    let mut lease = JobLease::new("a", 1_000, 5_000);
    assert_eq!(lease.fence, 1);
    // Held: another replica cannot take it before it lapses.
    assert_eq!(
        lease.claim("b", 5_999, 5_000),
        Err(LeaseRefusal::Held {
            owner: "a".into(),
            expires_ms: 6_000
        })
    );
    // The owner's heartbeat extends it.
    lease.renew(1, 5_000, 5_000).unwrap();
    assert!(lease.claim("b", 9_999, 5_000).is_err());
    // Lapsed: b takes it with a higher fence.
    assert_eq!(lease.claim("b", 10_000, 5_000), Ok(2));
    assert_eq!(lease.owner, "b");
    // a, paused past its lease, wakes and tries to write or renew: refused.
    assert_eq!(lease.admits(1), Err(LeaseRefusal::Fenced { current: 2 }));
    assert_eq!(
        lease.renew(1, 10_001, 5_000),
        Err(LeaseRefusal::Fenced { current: 2 })
    );
    assert_eq!(lease.admits(2), Ok(()));
    // Even if a comes back after b's lease lapsed, it must claim anew.
    assert_eq!(lease.claim("a", 20_000, 5_000), Ok(3));
    assert!(lease.admits(2).is_err());
}

#[test]
fn ten_thousand_jobs_start_in_weighted_fair_order() {
    // Three tenants weighted 1 : 1 : 2, 3,334 jobs each queued at once, one
    // job running at a time: while every tenant has jobs queued, each
    // window of 400 starts is split 100 / 100 / 200.
    let mut b = JobBacklog::new(limits(1), weights(&[("a", 1.0), ("b", 1.0), ("c", 2.0)]));
    let names: Vec<Arc<str>> = ["a", "b", "c"].into_iter().map(Arc::from).collect();
    for i in 0..3_334u32 {
        for t in &names {
            b.admit(t).unwrap();
            b.push(t, i, 100);
        }
    }
    let mut order = Vec::new();
    while let Some((t, _)) = b.start_next() {
        order.push(t.clone());
        b.stopped(&t, true);
    }
    assert_eq!(order.len(), 10_002);
    // c (weight 2) runs out first, after 6,668 starts: the first 6,400
    // are all made while every tenant has jobs queued.
    for window in order[..6_400].chunks(400) {
        let mut n: BTreeMap<&str, usize> = BTreeMap::new();
        for t in window {
            *n.entry(t).or_default() += 1;
        }
        assert_eq!((n["a"], n["b"], n["c"]), (100, 100, 200), "{n:?}");
    }
}

#[test]
fn running_limits_hold_and_a_full_tenant_lets_others_start() {
    let mut b = JobBacklog::new(
        JobLimits {
            held_per_tenant: 3,
            running_per_tenant: 2,
            running: 3,
        },
        weights(&[]),
    );
    let a: Arc<str> = Arc::from("a");
    let c: Arc<str> = Arc::from("c");
    for i in 0..3 {
        b.admit(&a).unwrap();
        b.push(&a, i, 1);
    }
    assert_eq!(b.admit(&a), Err(JobRefusal::TenantFull { held: 3 }));
    b.admit(&c).unwrap();
    b.push(&c, 10, 1);
    let mut started = Vec::new();
    while let Some((t, id)) = b.start_next() {
        started.push((t.to_string(), id));
    }
    // a may run two at once, three in all: a0, c10, a1 (tie a < c), not a2.
    assert_eq!(started.len(), 3);
    assert_eq!(started.iter().filter(|(t, _)| t == "a").count(), 2);
    assert_eq!(b.running(), 3);
    // FIFO within a tenant.
    let a_ids: Vec<u32> = started.iter().filter(|(t, _)| t == "a").map(|x| x.1).collect();
    assert_eq!(a_ids, [0, 1]);
    b.stopped("a", true);
    assert_eq!(b.start_next().map(|x| x.1), Some(2));
    assert_eq!(b.start_next(), None);
}

#[test]
fn a_cancelled_queued_job_is_released_and_an_idle_tenant_saves_no_credit() {
    let mut b = JobBacklog::new(limits(1), weights(&[]));
    let a: Arc<str> = Arc::from("a");
    let z: Arc<str> = Arc::from("z");
    b.admit(&a).unwrap();
    b.push(&a, 1, 1);
    b.admit(&a).unwrap();
    b.push(&a, 2, 1);
    assert!(b.remove("a", &2));
    assert!(!b.remove("a", &2));
    assert_eq!(b.by_tenant()[&a], (1, 1, 0));
    // a runs alone for a while; z arrives later and is not owed the past.
    let _ = b.start_next();
    b.stopped("a", true);
    for i in 0..100 {
        b.admit(&a).unwrap();
        b.push(&a, 100 + i, 1);
    }
    for _ in 0..50 {
        let (t, _) = b.start_next().unwrap();
        b.stopped(&t, true);
    }
    for i in 0..10 {
        b.admit(&z).unwrap();
        b.push(&z, 1000 + i, 1);
    }
    let mut next = Vec::new();
    for _ in 0..10 {
        let (t, _) = b.start_next().unwrap();
        b.stopped(&t, true);
        next.push(t.to_string());
    }
    // Alternating from here on, not ten of z in a row.
    assert_eq!(next.iter().filter(|t| *t == "z").count(), 5, "{next:?}");
}

#[test]
fn a_hold_released_without_a_run_frees_no_running_slot() {
    let mut b = JobBacklog::new(
        JobLimits {
            held_per_tenant: 2,
            running_per_tenant: 1,
            running: 1,
        },
        weights(&[]),
    );
    let a: Arc<str> = Arc::from("a");
    b.admit(&a).unwrap();
    b.push(&a, 1, 1);
    assert_eq!(b.start_next().map(|x| x.1), Some(1));
    // A second submission is admitted, then fails to be stored: its hold
    // goes back, the running job keeps its slot.
    b.admit(&a).unwrap();
    b.release("a");
    assert_eq!(b.running(), 1);
    b.admit(&a).unwrap();
    b.push(&a, 2, 1);
    assert_eq!(b.start_next(), None, "the one slot is still taken");
    assert_eq!(b.admit(&a), Err(JobRefusal::TenantFull { held: 2 }));
    b.stopped("a", true);
    assert_eq!(b.start_next().map(|x| x.1), Some(2));
}
