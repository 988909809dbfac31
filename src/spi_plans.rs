//! Prepared SPI plans kept for the life of the backend, one per statement text.
//!
//! Hot-path functions (ack, extend) run one or two short statements; preparing them once
//! per backend and reusing the saved plan keeps their cost at that of a prepared statement
//! sent by a client. Saved plans live in the plan cache, so DDL on the tables (or dropping
//! and re-creating the extension) re-plans them transparently.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys::PgOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Runs `f` with the saved plan of `sql` (argument types `args`), preparing it on first use.
pub fn with_plan<R>(
    client: &SpiClient<'_>,
    sql: &'static str,
    args: &[PgOid],
    f: impl FnOnce(&OwnedPreparedStatement) -> SpiResult<R>,
) -> SpiResult<R> {
    let cached = PLANS.with_borrow_mut(|plans| plans.remove(sql));
    let plan = match cached {
        Some(plan) => plan,
        None => client.prepare_mut(sql, args)?.keep(),
    };
    let result = f(&plan);
    PLANS.with_borrow_mut(|plans| plans.insert(sql, plan));
    result
}
