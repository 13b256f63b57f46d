//! The plain `Limiter` as a fleet (issue 13): four processes of 50 concurrent tasks each, on one
//! identity through one real `redis-server`, admit exactly the burst between them.

use tollgate_e2e::limiter_burst_bin;
use tollgate_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_of_fifty_tasks_admit_exactly_the_burst() {
    let redis = tokio::task::block_in_place(RedisServer::start).expect("redis-server starts");
    let url = redis.url();
    // All four at once, each in its own task.
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let command = tokio::process::Command::new(limiter_burst_bin())
                .args([url.as_str(), "tenant-7:slack", "50"])
                .kill_on_drop(true)
                .output();
            tokio::spawn(command)
        })
        .collect();
    let (mut granted, mut refused) = (0, 0);
    for run in runs {
        let output = run.await.expect("the task").expect("the helper ran");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}: {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let mut counts = stdout
            .split_whitespace()
            .map(|n| n.parse::<u32>().expect("a count"));
        granted += counts.next().expect("granted");
        refused += counts.next().expect("refused");
    }
    assert_eq!(
        (granted, refused),
        (100, 100),
        "200 calls against a burst of 100"
    );
}
