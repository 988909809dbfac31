//! A pg_keel queue worker on tokio-postgres.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tokio_postgres::Error> {
//! use keel_worker_example::{Job, Worker, WorkerConfig};
//! let config = WorkerConfig::new("host=db user=app dbname=app", "emails");
//! let worker = Worker::new(config, |tx: &tokio_postgres::Transaction<'_>, job: &Job| {
//!     let id = job.job_id;
//!     Box::pin(async move {
//!         // Writes through `tx` commit together with the ack.
//!         Ok::<(), String>(())
//!     })
//! });
//! worker.run(tokio::signal::ctrl_c()).await?;
//! # Ok(()) }
//! ```
//!
//! Its own statements go unnamed (`query_typed`: one round trip, no prepared statement), so
//! with `listen: false` it also runs behind PgBouncer in transaction pooling mode.
//!
//! What it relies on (docs/queues.md): a claimed job is leased for the visibility timeout; if
//! the process dies, the lease runs out and another worker claims the job with a higher
//! `attempt`, which the old lease can no longer ack. The handler runs in the transaction that
//! acks, so its writes to PostgreSQL commit with the ack or not at all. Just before a job starts
//! its lease is renewed (one whose lease ran out while earlier jobs of the batch ran, and that
//! another worker took, is skipped), and a heartbeat on a second connection extends it every
//! third of its length. Handlers need their own timeouts: a hung handler with a live heartbeat
//! holds its job for ever. A lost connection ends `run` with its error. When the shutdown future resolves,
//! the worker finishes the job in hand, gives the unstarted rest of its batch back with
//! `keel.snooze` (no attempt used up) and returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls, Transaction};

/// One claimed job.
#[derive(Debug, Clone)]
pub struct Job {
    pub job_id: i64,
    pub attempt: i32,
    pub payload: serde_json::Value,
    pub priority: i32,
    /// The lease's length: the queue's visibility timeout unless the config overrides it.
    pub lease: Duration,
}

/// Where and how a worker claims.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub conninfo: String,
    pub queue: String,
    /// Jobs per claim, 1 to 10,000.
    pub batch: i32,
    /// `None`: the queue's own.
    pub visibility_timeout: Option<Duration>,
    /// How long to wait for a NOTIFY before claiming anyway.
    pub poll_interval: Duration,
    /// `false` behind PgBouncer in transaction pooling mode, where LISTEN does not work.
    pub listen: bool,
    pub name: String,
}

impl WorkerConfig {
    pub fn new(conninfo: &str, queue: &str) -> WorkerConfig {
        WorkerConfig {
            conninfo: conninfo.into(),
            queue: queue.into(),
            batch: 10,
            visibility_timeout: None,
            poll_interval: Duration::from_secs(1),
            listen: true,
            name: format!("rust:{}", std::process::id()),
        }
    }
}

/// What a handler returns: its future, which fails the job with the error's text.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

pub struct Worker<H> {
    config: WorkerConfig,
    handler: H,
}

impl<H> Worker<H>
where
    H: for<'a> Fn(&'a Transaction<'a>, &'a Job) -> HandlerFuture<'a>,
{
    pub fn new(config: WorkerConfig, handler: H) -> Worker<H> {
        Worker { config, handler }
    }

    /// Runs until `shutdown` resolves; returns the number of jobs acked.
    pub async fn run(&self, shutdown: impl Future) -> Result<u64, tokio_postgres::Error> {
        let (stop_tx, mut stop) = watch::channel(false);
        let mut shutdown = Box::pin(shutdown);
        let mut work = connect(&self.config.conninfo, None).await?;
        let beat = Arc::new(connect(&self.config.conninfo, None).await?);
        let (wake_tx, mut wake) = mpsc::channel::<String>(64);
        let _listener = if self.config.listen {
            let listener = connect(&self.config.conninfo, Some(wake_tx)).await?;
            listener.batch_execute("LISTEN keel_jobs").await?;
            Some(listener)
        } else {
            None
        };
        let mut acked = 0;
        loop {
            let jobs = self.claim(&work).await?;
            if jobs.is_empty() {
                let poll = tokio::time::sleep(self.config.poll_interval);
                tokio::pin!(poll);
                loop {
                    tokio::select! {
                        _ = &mut shutdown, if !*stop.borrow() => { let _ = stop_tx.send(true); }
                        _ = stop.changed() => {}
                        _ = &mut poll => break,
                        Some(queue) = wake.recv() => if queue == self.config.queue { break },
                    }
                    if *stop.borrow() {
                        break;
                    }
                }
                if *stop.borrow() {
                    return Ok(acked);
                }
                continue;
            }
            for (i, job) in jobs.iter().enumerate() {
                // A shutdown that arrived during the last job stops before the next one.
                if !*stop.borrow() {
                    if let Some(Some(())) = futures_util::FutureExt::now_or_never(
                        futures_util::FutureExt::map(&mut shutdown, |_| Some(())),
                    ) {
                        let _ = stop_tx.send(true);
                    }
                }
                if *stop.borrow() {
                    self.give_back(&work, &jobs[i..]).await?;
                    return Ok(acked);
                }
                if self.process(&mut work, &beat, job).await? {
                    acked += 1;
                }
            }
        }
    }

    async fn claim(&self, work: &Client) -> Result<Vec<Job>, tokio_postgres::Error> {
        let vt = self
            .config
            .visibility_timeout
            .map(|d| format!("{} ms", d.as_millis()));
        // now() is the claim's start: the lease's length without comparing clocks.
        let rows = work
            .query_typed(
                "SELECT job_id, attempt, payload, priority,
                        extract(epoch FROM lease_expires_at - now())::float8
                   FROM keel.claim($1, $2, $3::text::interval, $4)",
                &[
                    (&self.config.queue, Type::TEXT),
                    (&self.config.batch, Type::INT4),
                    (&vt, Type::TEXT),
                    (&self.config.name, Type::TEXT),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Job {
                job_id: r.get(0),
                attempt: r.get(1),
                payload: r.get(2),
                priority: r.get(3),
                lease: Duration::from_secs_f64(r.get::<_, f64>(4).clamp(0.001, 1e9)),
            })
            .collect())
    }

    /// Runs the handler and acks in one transaction, with the heartbeat going; fails the job
    /// when the handler errs. True when acked.
    async fn process(
        &self,
        work: &mut Client,
        beat: &Arc<Client>,
        job: &Job,
    ) -> Result<bool, tokio_postgres::Error> {
        // The batch's later jobs waited while earlier ones ran: renew this one's lease before
        // starting, and skip it if it ran out and another worker has it now.
        let renewed = work
            .query_typed(
                "SELECT keel.extend($1, $2, $3::text::interval) IS NOT NULL",
                &[
                    (&job.job_id, Type::INT8),
                    (&job.attempt, Type::INT4),
                    (&format!("{} ms", job.lease.as_millis()), Type::TEXT),
                ],
            )
            .await?;
        if renewed.first().map(|row| row.get::<_, bool>(0)) != Some(true) {
            return Ok(false);
        }
        let heartbeat = self.heartbeat(beat.clone(), job);
        let outcome = async {
            let tx = work.transaction().await?;
            if let Err(error) = (self.handler)(&tx, job).await {
                tx.rollback().await?;
                return Ok(Err(error));
            }
            let held: Option<bool> = tx
                .query_typed(
                    "SELECT keel.ack($1, $2)",
                    &[(&job.job_id, Type::INT8), (&job.attempt, Type::INT4)],
                )
                .await?
                .first()
                .and_then(|row| row.get(0));
            if held == Some(true) {
                tx.commit().await?;
                Ok(Ok(true))
            } else {
                // The lease was lost (another worker has the job): roll the writes back.
                tx.rollback().await?;
                Ok(Ok(false))
            }
        }
        .await;
        heartbeat.abort();
        let _ = heartbeat.await;
        match outcome {
            Ok(Ok(acked)) => Ok(acked),
            Ok(Err(error)) => {
                let error: String = error.chars().take(1000).collect();
                work.query_typed(
                    "SELECT keel.fail($1, $2, $3)",
                    &[
                        (&job.job_id, Type::INT8),
                        (&job.attempt, Type::INT4),
                        (&error, Type::TEXT),
                    ],
                )
                .await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn heartbeat(&self, beat: Arc<Client>, job: &Job) -> tokio::task::JoinHandle<()> {
        let every = job.lease / 3;
        let by = format!("{} ms", job.lease.as_millis());
        let (id, attempt) = (job.job_id, job.attempt);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let until = beat
                    .query_typed(
                        "SELECT keel.extend($1, $2, $3::text::interval) IS NOT NULL",
                        &[(&id, Type::INT8), (&attempt, Type::INT4), (&by, Type::TEXT)],
                    )
                    .await;
                let held = until
                    .ok()
                    .and_then(|rows| rows.first().map(|row| row.get::<_, bool>(0)));
                if held != Some(true) {
                    return; // lost or failing: the ack will tell
                }
            }
        })
    }

    async fn give_back(&self, work: &Client, jobs: &[Job]) -> Result<(), tokio_postgres::Error> {
        for job in jobs {
            work.query_typed(
                "SELECT keel.snooze($1, $2, '0')",
                &[(&job.job_id, Type::INT8), (&job.attempt, Type::INT4)],
            )
            .await?;
        }
        Ok(())
    }
}

/// A connection whose driver task runs in the background, forwarding NOTIFY payloads to
/// `notifications` when given.
async fn connect(
    conninfo: &str,
    notifications: Option<mpsc::Sender<String>>,
) -> Result<Client, tokio_postgres::Error> {
    let (client, mut connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if let Some(tx) = &notifications {
                        let _ = tx.try_send(n.payload().to_string());
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    Ok(client)
}
