//! The demo worker: `keel-worker --queue emails [--batch 10] [--visibility-timeout 30]
//! [--poll-interval 1] [--no-listen]`, conninfo from `DATABASE_URL`; SIGTERM or Ctrl-C stops
//! it cleanly. Its job sleeps `sleep_ms`, fails while `attempt <= fail_times`, then records
//! itself in `examples.done` in the ack's transaction.

use std::time::Duration;

use keel_worker_example::{HandlerFuture, Job, Worker, WorkerConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio_postgres::Transaction;

fn handler<'a>(tx: &'a Transaction<'a>, job: &'a Job) -> HandlerFuture<'a> {
    Box::pin(async move {
        let field = |name: &str| job.payload.get(name).and_then(|v| v.as_i64()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(
            field("sleep_ms").clamp(0, 60_000) as u64
        ))
        .await;
        if i64::from(job.attempt) <= field("fail_times") {
            return Err(format!("planned failure on attempt {}", job.attempt));
        }
        tx.execute(
            "INSERT INTO examples.done (job_id, attempt, payload) VALUES ($1, $2, $3)",
            &[&job.job_id, &job.attempt, &job.payload],
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(())
    })
}

fn config() -> Result<WorkerConfig, String> {
    let conninfo = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let mut config = WorkerConfig::new(&conninfo, "");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let seconds = |v: String| {
            v.parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && *s < 86_400.0)
                .map(Duration::from_secs_f64)
                .ok_or(format!("{flag}: not a number of seconds"))
        };
        match flag.as_str() {
            "--queue" => config.queue = value()?,
            "--batch" => config.batch = value()?.parse().map_err(|_| "--batch: not a number")?,
            "--visibility-timeout" => config.visibility_timeout = Some(seconds(value()?)?),
            "--poll-interval" => config.poll_interval = seconds(value()?)?,
            "--name" => config.name = value()?,
            "--no-listen" => config.listen = false,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if config.queue.is_empty() {
        return Err("--queue is required".into());
    }
    Ok(config)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let config = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keel-worker: {e}");
            std::process::exit(2);
        }
    };
    // Installed before the first job, so a SIGTERM at any moment stops the worker cleanly.
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keel-worker: cannot handle SIGTERM: {e}");
            std::process::exit(1);
        }
    };
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    match Worker::new(config, handler).run(shutdown).await {
        Ok(acked) => println!("stopped after {acked} jobs"),
        Err(e) => {
            eprintln!("keel-worker: {e}");
            std::process::exit(1);
        }
    }
}
