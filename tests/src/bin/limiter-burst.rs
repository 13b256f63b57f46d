//! A helper process of the e2e tests: `limiter-burst REDIS_URL KEY TASKS` runs TASKS concurrent
//! `Limiter::check`s on one identity through Redis (burst 100 an hour) and prints how many were
//! granted. Several of these at once must admit exactly the burst between them.

use std::process::ExitCode;
use std::time::Duration;

use tollgate::core::Quota;
use tollgate::limiter::Limiter;
use tollgate::redis::RedisStore;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, key, tasks] = args.as_slice() else {
        eprintln!("usage: limiter-burst REDIS_URL KEY TASKS");
        return ExitCode::from(2);
    };
    let Ok(tasks) = tasks.parse::<usize>() else {
        eprintln!("limiter-burst: TASKS must be a number");
        return ExitCode::from(2);
    };
    let store = match RedisStore::builder(url.clone())
        .timeout(Duration::from_secs(2))
        .connect()
        .await
    {
        Ok(store) => store,
        Err(e) => {
            eprintln!("limiter-burst: {e}");
            return ExitCode::FAILURE;
        }
    };
    let quota = match Quota::per_hour(100) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("limiter-burst: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limiter = match Limiter::builder()
        .limit("burst", quota)
        .store(store)
        .timeout(Duration::from_secs(2))
        .on_store_error(tollgate::limiter::OnStoreError::FailClosed)
        .build()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("limiter-burst: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let limiter = limiter.clone();
        let key = key.clone();
        set.spawn(async move { limiter.check("burst", &key).await });
    }
    let (mut granted, mut refused) = (0, 0);
    while let Some(done) = set.join_next().await {
        match done {
            Ok(Ok(_)) => granted += 1,
            Ok(Err(e)) if e.is_rate_limited() => refused += 1,
            Ok(Err(e)) => {
                eprintln!("limiter-burst: {e}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("limiter-burst: a task failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{granted} {refused}");
    ExitCode::SUCCESS
}
