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
        // SAFETY: the caller promises a non-null jsonb datum, i.e. a valid (possibly toasted or
        // compressed) varlena that pg_detoast_datum_copy can read; `context` is a live memory
        // context, current only for the copy (switch_to switches back, also on error).
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
    /// Keeps the datum as it is (toasted or not), without reading it.
    ///
    /// # Safety
    /// As [`FromDatum::from_polymorphic_datum`]: when `is_null` is false, `datum` is a jsonb
    /// value that stays allocated as long as the returned `RawJsonb` is used.
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null).then_some(RawJsonb(datum))
    }

    /// Copies the value (detoasted) into `context`.
    ///
    /// # Safety
    /// As [`FromDatum::from_datum_in_memory_context`]: when `is_null` is false, `datum` is a
    /// jsonb value readable for the duration of the call, and `context` is a live context.
    unsafe fn from_datum_in_memory_context(
        context: PgMemoryContexts,
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: not null (checked above), and a jsonb datum as this function's caller
        // promises; `context` is the caller's live memory context.
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
    /// # Safety
    /// As [`pgrx::datum::UnboxDatum::unbox`]: `d` is a non-null jsonb element of an array
    /// that outlives `'src`.
    unsafe fn unbox<'src>(d: pgrx::datum::Datum<'src>) -> Self::As<'src>
    where
        Self: 'src,
    {
        RawJsonb(d.sans_lifetime())
    }
}

// SAFETY: RawJsonb is exactly a jsonb datum: it is read only as jsonb (FromDatum, ArgAbi)
// and handed back only as jsonb (IntoDatum::type_oid is JSONBOID, BoxRet returns the datum),
// so declaring it `jsonb` in SQL for arguments and results matches what it holds.
unsafe impl SqlTranslatable for RawJsonb {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RawJsonb);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}

// SAFETY: an argument declared jsonb (SqlTranslatable above) is unboxed through FromDatum,
// which keeps the datum; a NULL becomes a panic (an ERROR), never a RawJsonb of a null
// pointer.
unsafe impl<'fcx> ArgAbi<'fcx> for RawJsonb {
    /// # Safety
    /// As [`ArgAbi::unbox_arg_unchecked`]: `arg` is an argument of this call declared jsonb.
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the argument is declared jsonb (the caller's promise), so its datum is a
        // jsonb value of the caller's memory, valid for the whole call; a null is turned into
        // None by from_polymorphic_datum and refused below.
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

// SAFETY: the result is declared jsonb (SqlTranslatable above) and a RawJsonb always holds a
// non-null jsonb datum; it is handed back unchanged, never as the SQL null.
unsafe impl BoxRet for RawJsonb {
    /// # Safety
    /// As [`BoxRet::box_into`]: the datum is returned to the function's caller, and it lives
    /// in memory that outlasts the call (an argument's, or a context such as the SRF's
    /// multi-call context the value was copied into).
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        // SAFETY: a non-null jsonb datum for a function declared to return jsonb, alive past
        // the call as the caller of box_into promises.
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
