//! Request headers read through Envoy's `request.headers` attribute rather than the header
//! map call: the map call hands over only the first value of a repeated header, so a
//! request carrying `X-API-Token` twice could have one value checked while the other is
//! what a later hop reads. The attribute joins repeated values with `,`, which no token
//! contains, so such a request is refused as malformed. The call is made directly because
//! the SDK's getter panics on statuses it does not expect, and a panic traps the VM.

#[link(wasm_import_module = "env")]
extern "C" {
    // The SDK declares the same import returning its `Status` enum; a plain integer here
    // keeps an unexpected status from being an invalid enum value.
    #[allow(clashing_extern_declarations)]
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

const STATUS_OK: u32 = 0;

/// The header's value (repeats joined with `,`), `Some(empty)` for a header sent empty,
/// `None` when absent or when the host could not answer.
pub fn get(name: &str) -> Option<Vec<u8>> {
    let mut path = Vec::with_capacity(17 + name.len());
    path.extend_from_slice(b"request\0headers\0");
    path.extend_from_slice(name.as_bytes());
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a buffer it allocated through this module's
    // `proxy_on_memory_allocate` (the SDK's, a `Vec` allocation) and its size; ownership
    // passes to us, as in the SDK's own getters.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    if status != STATUS_OK {
        return None;
    }
    if data.is_null() {
        return Some(Vec::new());
    }
    // SAFETY: see above; `size` bytes at `data`, allocated with capacity `size`.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}
