//! Request headers for the credential. The header-map call hands over only the first value
//! of a repeated header, so a request carrying `X-API-Token` twice could have one value
//! checked while the other is what a later hop reads. Envoy's `request.headers` attribute
//! joins repeated values with `,`, which no token contains, so such a request is refused as
//! malformed; it costs more than the map call, though, so it is kept for headers Envoy does
//! not join itself. `authorization` is one of Envoy's inline headers, which its header map
//! already joins, so the cheaper map call is exact for it. Both calls are made directly
//! because the SDK's getters panic on statuses they do not expect, and a panic traps the VM.

#[link(wasm_import_module = "env")]
extern "C" {
    // The SDK declares the same imports returning its `Status` enum; a plain integer here
    // keeps an unexpected status from being an invalid enum value.
    #[allow(clashing_extern_declarations)]
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    #[allow(clashing_extern_declarations)]
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

const STATUS_OK: u32 = 0;
const REQUEST_HEADERS: u32 = 0;
/// Headers Envoy's header map joins when repeated (its inline headers) that a token can
/// travel in.
const JOINED_BY_ENVOY: [&str; 1] = ["authorization"];

/// The header's value (repeats joined with `,`), `Some(empty)` for a header sent empty,
/// `None` when absent or when the host could not answer.
pub fn get(name: &str) -> Option<Vec<u8>> {
    if JOINED_BY_ENVOY.contains(&name) {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: as in `owned` below.
        let status = unsafe {
            proxy_get_header_map_value(
                REQUEST_HEADERS,
                name.as_ptr(),
                name.len(),
                &mut data,
                &mut size,
            )
        };
        return owned(status, data, size);
    }
    let mut path = Vec::with_capacity(17 + name.len());
    path.extend_from_slice(b"request\0headers\0");
    path.extend_from_slice(name.as_bytes());
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a buffer it allocated through this module's
    // `proxy_on_memory_allocate` (the SDK's, a `Vec` allocation) and its size; ownership
    // passes to us, as in the SDK's own getters.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    owned(status, data, size)
}

fn owned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status != STATUS_OK {
        return None;
    }
    if data.is_null() {
        return Some(Vec::new());
    }
    // SAFETY: the host allocated `size` bytes at `data` through this module's
    // `proxy_on_memory_allocate` (a `Vec` of capacity `size`); ownership passes to us.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}
