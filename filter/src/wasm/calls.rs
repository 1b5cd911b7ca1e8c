//! Status-checked proxy-wasm host calls for everything a request touches (headers, the
//! local reply, shared data, the clock) and for logging. The SDK's own wrappers panic on
//! any status they do not expect, and its imports return a `Status` enum, so an unknown
//! code would be an invalid enum value; a panic traps the VM, which then answers 503 to
//! everything. These declare the same imports returning a plain integer and turn every
//! status into a `Result` (see `crate::abi`). `clippy.toml` disallows the SDK wrappers they
//! replace.
//!
//! Reading request headers: the header-map call for one header hands over only the first
//! value of a repeated header, so a request carrying `X-API-Token` twice could have one value
//! checked while the other is what a later hop reads. The request path therefore reads the
//! whole map (`map_pairs`), sees every copy, and joins repeats (`abi::header_value`).

// Not every call is used by every build (the bench's waterfall filters use fewer).
#![allow(dead_code)]

use crate::abi::{self, STATUS_CAS_MISMATCH, STATUS_NOT_FOUND, STATUS_OK};

#[link(wasm_import_module = "env")]
#[allow(clashing_extern_declarations)]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        additional_headers_map_data: *const u8,
        additional_headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
}

/// Header maps, by the ABI's numbers.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Headers {
    Request = 0,
    Response = 2,
    HttpCallResponse = 6,
}

/// Log levels, by the ABI's numbers.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Level {
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Takes ownership of a buffer the host handed over.
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host allocated `size` bytes at `data` through this module's
    // `proxy_on_memory_allocate` (the SDK's, a `Vec` of capacity `size`); ownership passes
    // to us, as in the SDK's own getters.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// One value of a header map: `Ok(None)` when absent.
pub fn map_value(map: Headers, name: &str) -> Result<Option<Vec<u8>>, u32> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: valid pointers to our locals; the host writes a buffer it allocated.
    let status = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match status {
        STATUS_OK => Ok(Some(owned(data, size))),
        STATUS_NOT_FOUND => Ok(None),
        other => Err(other),
    }
}

/// A whole header map, serialized (decode it with `abi::decode_pairs`).
pub fn map_pairs(map: Headers) -> Result<Vec<u8>, u32> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: valid pointers to our locals; the host writes a buffer it allocated.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    abi::checked(status).map(|()| owned(data, size))
}

/// Sets a header, replacing every copy already there.
pub fn replace(map: Headers, name: &str, value: &[u8]) -> Result<(), u32> {
    // SAFETY: the host only reads the given ranges.
    abi::checked(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes every copy of a header (the name as bytes: it may not be UTF-8).
pub fn remove(map: Headers, name: &[u8]) -> Result<(), u32> {
    // SAFETY: the host only reads the given range.
    abi::checked(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// Adds a header beside any copies already there.
pub fn add(map: Headers, name: &str, value: &[u8]) -> Result<(), u32> {
    // SAFETY: the host only reads the given ranges.
    abi::checked(unsafe {
        proxy_add_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Answers the request from the filter. `grpc_status`: the request is gRPC and the host
/// should answer it as such, with this status.
pub fn send_local_response(
    status: u32,
    headers: &[(&str, &[u8])],
    body: &[u8],
    grpc_status: Option<u32>,
) -> Result<(), u32> {
    let headers = abi::encode_pairs(headers);
    let grpc_status = grpc_status
        .and_then(|s| i32::try_from(s).ok())
        .unwrap_or(-1);
    // SAFETY: the host only reads the given ranges.
    abi::checked(unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    })
}

/// A shared-data value and its CAS stamp (0 when absent); `Err` with the host's status.
pub fn shared_get(key: &str) -> Result<(Option<Vec<u8>>, u32), u32> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: valid pointers to our locals; the host writes a buffer it allocated.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        STATUS_OK if data.is_null() => Ok((None, cas)),
        STATUS_OK => Ok((Some(owned(data, size)), cas)),
        STATUS_NOT_FOUND => Ok((None, 0)),
        other => Err(other),
    }
}

pub enum SetError {
    CasMismatch,
    Host,
}

/// Writes a shared-data value when `cas` is 0 or still current.
pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
    // SAFETY: the host only reads the given ranges.
    let status =
        unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
    match status {
        STATUS_OK => Ok(()),
        STATUS_CAS_MISMATCH => Err(SetError::CasMismatch),
        _ => Err(SetError::Host),
    }
}

/// The host's clock in nanoseconds since the Unix epoch; `None` when it did not answer.
pub fn now_nanos() -> Option<u64> {
    let mut t: u64 = 0;
    // SAFETY: a valid pointer to our local.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut t) };
    (status == STATUS_OK).then_some(t)
}

pub fn log(level: Level, message: &str) {
    // SAFETY: the host only reads the given range. A log line that cannot be written is
    // dropped: there is nowhere else to say so.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}
