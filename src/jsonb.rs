//! `RawJsonb`: a jsonb value kept as the Postgres datum it is, so payloads pass through
//! pg_keel's native functions without being parsed into Rust and serialized back.

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::memcxt::PgMemoryContexts;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::{FromDatum, IntoDatum};

#[derive(Clone, Copy, Debug)]
pub struct RawJsonb(pg_sys::Datum);

impl RawJsonb {
    /// Copies a jsonb datum (detoasted) into `context`, e.g. out of SPI's memory before
    /// SPI_finish frees it.
    ///
    /// # Safety
    /// `datum` must be a non-null jsonb datum.
    pub unsafe fn copy_into(datum: pg_sys::Datum, context: pg_sys::MemoryContext) -> RawJsonb {
        unsafe {
            PgMemoryContexts::For(context).switch_to(|_| {
                RawJsonb(pg_sys::Datum::from(pg_sys::pg_detoast_datum_copy(
                    datum.cast_mut_ptr(),
                )))
            })
        }
    }
}

impl FromDatum for RawJsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null).then_some(RawJsonb(datum))
    }

    unsafe fn from_datum_in_memory_context(
        context: PgMemoryContexts,
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        Some(unsafe { RawJsonb::copy_into(datum, context.value()) })
    }
}

impl IntoDatum for RawJsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

// SAFETY: a jsonb element of an array is a varlena datum like any jsonb value; it is kept as
// the datum, pointing into the array, which outlives it ('src).
unsafe impl pgrx::datum::UnboxDatum for RawJsonb {
    type As<'src> = RawJsonb;
    unsafe fn unbox<'src>(d: pgrx::datum::Datum<'src>) -> Self::As<'src>
    where
        Self: 'src,
    {
        RawJsonb(d.sans_lifetime())
    }
}

unsafe impl SqlTranslatable for RawJsonb {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RawJsonb);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}

unsafe impl<'fcx> ArgAbi<'fcx> for RawJsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

unsafe impl BoxRet for RawJsonb {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

/// The size of a jsonb value once detoasted, read from its header without decompressing
/// (`pg_column_size` says how much it takes on disk, which compression can make far smaller
/// than what a reader holds in memory). For the batches that are bounded in bytes: a claim's
/// payloads and a dispatch round's events.
#[pgrx::pg_extern(immutable, strict, parallel_safe, name = "_raw_bytes")]
fn raw_bytes(value: RawJsonb) -> i32 {
    // A varlena is at most 1 GB.
    i32::try_from(raw_size(value)).unwrap_or(i32::MAX)
}

/// The detoasted size of a jsonb value (see `_raw_bytes`).
pub fn raw_size(value: RawJsonb) -> i64 {
    // SAFETY: a non-null jsonb value is a varlena datum (possibly toasted or compressed);
    // toast_raw_datum_size reads only its header (and an external pointer's descriptor).
    unsafe { pg_sys::toast_raw_datum_size(value.0) as i64 }
}
