//! Two dispatcher processes sharing a tenant's daily money budget through a
//! real redis-server: requests sent alternately to the two replicas, a few
//! sync intervals apart, are served until the tenant's spend on both
//! together reaches the budget, and not beyond (each replica alone would
//! serve the whole budget again); both replicas' Admin shows the whole
//! spend.

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use common::replicas::{all_in, replicas, work_request};
use common::{SimRegion, admin, client, eventually};
use dispatcher::pb;
use tonic::Code;

/// 10 per million tokens in and out: a 300-token request costs 0.003.
const BUDGET_MICROS: u64 = 30_000;

async fn spent_today(addr: std::net::SocketAddr) -> u64 {
    admin(addr)
        .await
        .get_tenant(pb::GetTenantRequest {
            name: "anonymous".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .spent_today
        .map_or(0, |c| c.micros)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_a_tenants_daily_money_budget() {
    let redis = RedisServer::start();
    let (_dirs, _sim, procs) = replicas(
        &redis,
        2,
        "[[tenants]]\nname = \"anonymous\"\ndaily_cost_budget = 0.03\n",
        SimRegion {
            tokens_per_minute: 6_000_000,
            requests_per_minute: 100_000,
            sim_args: &[
                "--base-latency-ms",
                "2",
                "--ms-per-1k-tokens",
                "0",
                "--completion-min-fraction",
                "1",
            ],
            extra_toml: "price = { input = 10.0, output = 10.0 }\n",
            ..Default::default()
        },
    );
    let addrs = [procs[0].addr, procs[1].addr];
    all_in(&addrs, "shared", Duration::from_secs(3)).await;
    let mut grpc = [client(addrs[0]).await, client(addrs[1]).await];

    let (mut served, mut spent, mut refused) = (0u64, 0u64, Vec::new());
    for i in 0..20 {
        match grpc[i % 2].dispatch(work_request()).await {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.cost.as_ref().unwrap().micros, 3_000, "{r:?}");
                served += 1;
                spent += 3_000;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(
                    s.message().contains("daily_cost_budget 0.030000 reached"),
                    "{}",
                    s.message()
                );
                refused.push(i);
            }
        }
        // Three sync intervals (100 ms each): the other replica has seen it.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("served {served} of 20; refused at {refused:?}");
    assert_eq!(
        served,
        BUDGET_MICROS / 3_000,
        "the budget held across the replicas (each alone would serve it twice over)"
    );
    assert_eq!(refused, (10..20).collect::<Vec<_>>());
    // Both replicas count the whole spend.
    for a in addrs {
        let seen = eventually(
            Duration::from_secs(2),
            || async move { spent_today(a).await == spent },
        )
        .await;
        assert!(seen.is_some(), "{a}: {} of {spent}", spent_today(a).await);
    }
}
