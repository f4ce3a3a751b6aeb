//! Live quota edits: a region file changed under load applies within two
//! seconds without a restart; a broken edit is refused with file, key and
//! problem in the log while the last good config keeps serving; work in
//! flight on a removed region finishes; an added region takes work; a
//! `*.toml` that is a directory or a symlink loop is said once, not skipped
//! in silence.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{ConfigDir, admin, client, dispatcher, eventually, region_sim, region_status, region_toml};
use dispatcher::pb;

const DISPATCHER_TOML: &str = r#"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
max_request_tokens = 100000
"#;

fn request(tokens: u64) -> pb::DispatchRequest {
    pb::DispatchRequest {
        model: "gpt-4o".into(),
        payload: "edit me".into(),
        prompt_tokens: tokens,
        max_output_tokens: 16,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_edits_apply_live_and_broken_ones_are_refused() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let a = region_sim(
        cfg.path(),
        "a",
        &["--model", "gpt-4o:1000000:1000000", "--ms-per-1k-tokens", "5"],
    );
    let b = region_sim(
        cfg.path(),
        "b",
        &[
            "--model",
            "gpt-4o:1000000:1000000",
            "--ms-per-1k-tokens",
            "5",
            "--base-latency-ms",
            "1500",
        ],
    );
    let c = region_sim(
        cfg.path(),
        "c",
        &["--model", "gpt-4o:1000000:1000000", "--ms-per-1k-tokens", "5"],
    );
    let a_toml = |tpm: u64| region_toml("a", &a.endpoint(), 256, &[("gpt-4o", tpm, 1_000_000, "usage")]);
    cfg.write_region("a", &a_toml(1_000_000));
    cfg.write_region(
        "b",
        &region_toml(
            "b",
            &b.endpoint(),
            256,
            &[("gpt-4o", 1_000_000, 1_000_000, "usage")],
        ),
    );
    let d = dispatcher(&cfg.config());
    let grpc = client(d.addr).await;

    // Steady background load on every region while the files change.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let background = {
        let (stop, failures, served, grpc) = (stop.clone(), failures.clone(), served.clone(), grpc.clone());
        tokio::spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                let mut g = grpc.clone();
                let (failures, served) = (failures.clone(), served.clone());
                calls.spawn(async move {
                    match g.dispatch(request(200)).await {
                        Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                        Err(s) => {
                            eprintln!("background request failed: {:?} {}", s.code(), s.message());
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while calls.join_next().await.is_some() {}
        })
    };

    // 1. Lower a's quota: the new limit shows within two seconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cfg.write_region("a", &a_toml(6_000));
    let took = eventually(Duration::from_secs(3), || async {
        region_status(d.addr, "a").await.unwrap().models[0].tokens_per_minute == 6_000
    })
    .await
    .expect("the lowered limit was applied");
    println!("lowered tokens_per_minute applied after {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let route = client(d.addr)
        .await
        .route(request(7_000))
        .await
        .unwrap()
        .into_inner();
    let a_route = route.candidates.iter().find(|c| c.region == "a").unwrap();
    assert!(!a_route.eligible);
    assert!(
        a_route
            .excluded_reason
            .contains("more than the bucket holds (6000)"),
        "{a_route:?}"
    );

    // 2. A broken edit: refused, logged with file, key and problem; the
    //    last good config keeps serving.
    cfg.write_region(
        "a",
        &a_toml(6_000).replace("tokens_per_minute = 6000", "tokens_per_minute = \"lots\""),
    );
    let logged = eventually(Duration::from_secs(3), || async {
        d.logs().contains("refused region config change")
    })
    .await;
    assert!(logged.is_some(), "the refusal was logged:\n{}", d.logs());
    let logs = d.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("refused region config change"))
        .unwrap();
    println!("{line}");
    assert!(line.contains("a.toml") && line.contains("models[0].tokens_per_minute") && line.contains("lots"));
    assert_eq!(
        line.matches("models[0].tokens_per_minute").count(),
        1,
        "the key is named once: {line}"
    );
    assert_eq!(
        region_status(d.addr, "a").await.unwrap().models[0].tokens_per_minute,
        6_000
    );
    client(d.addr)
        .await
        .dispatch(request(100))
        .await
        .expect("still serving");
    // Reloads are all or nothing over the directory: fix the file before
    // the next change. Fixed, it is said to be valid again.
    cfg.write_region("a", &a_toml(6_000));
    let fixed = eventually(Duration::from_secs(3), || async {
        d.logs().contains("region files valid again")
    })
    .await;
    assert!(fixed.is_some(), "the fix was logged:\n{}", d.logs());

    // 3. Remove b while work is in flight there (b takes 1.5 s a request);
    //    add c. The work on b finishes; b goes; c takes work.
    let mut on_b = Vec::new();
    let mut admin = admin(d.addr).await;
    admin
        .drain_region(pb::RegionRequest { region: "a".into() })
        .await
        .unwrap();
    for _ in 0..5 {
        let mut g = grpc.clone();
        on_b.push(tokio::spawn(async move { g.dispatch(request(100)).await }));
    }
    let in_flight = eventually(Duration::from_secs(2), || async {
        region_status(d.addr, "b")
            .await
            .map(|s| s.in_flight >= 5)
            .unwrap_or(false)
    })
    .await;
    assert!(in_flight.is_some(), "work is in flight on b");
    std::fs::remove_file(cfg.region_file("b")).unwrap();
    cfg.write_region(
        "c",
        &region_toml(
            "c",
            &c.endpoint(),
            256,
            &[("gpt-4o", 1_000_000, 1_000_000, "usage")],
        ),
    );
    let took = eventually(Duration::from_secs(3), || async {
        let regions = admin_regions(d.addr).await;
        regions == ["a", "c"]
    })
    .await
    .expect("b removed and c added");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    for call in on_b {
        let reply = call
            .await
            .unwrap()
            .expect("work in flight on a removed region finishes");
        assert_eq!(reply.into_inner().region, "b");
    }
    admin
        .resume_region(pb::RegionRequest { region: "a".into() })
        .await
        .unwrap();
    let reply = client(d.addr)
        .await
        .dispatch(request(100))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.region == "a" || reply.region == "c");

    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();
    println!(
        "background load: {} served, {} failed",
        served.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed)
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed while the files changed"
    );
    assert!(
        d.logs()
            .contains("settled work on a region or model removed by a reload")
    );
}

async fn admin_regions(addr: std::net::SocketAddr) -> Vec<String> {
    admin(addr)
        .await
        .list_regions(pb::ListRegionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .regions
        .into_iter()
        .map(|r| r.name)
        .collect()
}

/// A region "file" that is a directory or a symlink loop is no region
/// file: it is skipped, and the log says so once per path (not at every
/// look, and again when it changes), while edits to the real files apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_or_a_symlink_loop_among_the_region_files_is_said_once() {
    let cfg = ConfigDir::new(DISPATCHER_TOML);
    let sim = |tpm: u64| {
        format!(
            "name = \"a\"\n[[models]]\nname = \"gpt-4o\"\ntokens_per_minute = {tpm}\nrequests_per_minute = 1000\n[simulate]\nms_per_1k_tokens = 1\n"
        )
    };
    cfg.write_region("a", &sim(100_000));
    let regions = cfg.path().join("regions");
    std::fs::create_dir(regions.join("folder.toml")).unwrap();
    std::os::unix::fs::symlink(regions.join("loop.toml"), regions.join("loop.toml")).unwrap();
    let d = dispatcher(&cfg.config());
    let said = |what: &str| d.logs().matches(what).count();
    let folder = "folder.toml: it is a directory, not a region file";
    let looped = "loop.toml: it cannot be read (Too many levels of symbolic links";
    eventually(Duration::from_secs(5), || async {
        said(folder) == 1 && said(looped) == 1
    })
    .await
    .unwrap_or_else(|| panic!("no word about the skipped entries:\n{}", d.logs()));

    // Two edits applied: the watch looked again at least twice.
    for tpm in [200_000, 300_000] {
        cfg.write_region("a", &sim(tpm));
        eventually(Duration::from_secs(5), || async {
            region_status(d.addr, "a").await.unwrap().models[0].tokens_per_minute == tpm
        })
        .await
        .expect("the edit applied");
    }
    assert_eq!((said(folder), said(looped)), (1, 1), "{}", d.logs());

    // The folder becomes a link to nowhere: said again, in its new words.
    std::fs::remove_dir(regions.join("folder.toml")).unwrap();
    std::os::unix::fs::symlink(regions.join("nowhere"), regions.join("folder.toml")).unwrap();
    eventually(Duration::from_secs(5), || async {
        said("folder.toml: it cannot be read (No such file or directory") == 1
    })
    .await
    .unwrap_or_else(|| panic!("no word about the changed entry:\n{}", d.logs()));
    assert_eq!(said(looped), 1, "{}", d.logs());
}
