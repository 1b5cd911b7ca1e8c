//! Bindings to Envoy's dynamic-module ABI (`envoy.filters.http.dynamic_modules`), written for
//! the part of it that tokengate uses and checked against Envoy 1.40.0. Every `unsafe` in the
//! crate lives here: the declarations of Envoy's callbacks, the event hooks Envoy calls, and
//! thin safe wrappers around both.
//!
//! The rest of the crate implements [`Plugin`] (for `crate::Module`); the hooks at the end of
//! this file call it. A hook checks every pointer Envoy hands it, and catches a panic at the boundary: a panic never
//! unwinds into Envoy (which would abort the process); on the request path it becomes a local
//! 503 that the plugin counts.
//!
//! The module is linked with immediate binding (`build.rs`), so that loading it into an Envoy
//! that lacks one of the callbacks declared here fails at load time with Envoy's `dlopen`
//! error, instead of crashing on the first request that calls the missing symbol.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{Mutex, PoisonError};

/// The ABI version this module was written against. Envoy only logs a warning when it differs;
/// what makes a module incompatible is a missing callback, which immediate binding turns into a
/// load error.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

// ---------------------------------------------------------------------------------------
// Types of the ABI
// ---------------------------------------------------------------------------------------

/// A byte range owned by Envoy, valid for the duration of the hook that produced it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    len: usize,
}

/// A byte range owned by the module, lent to Envoy for one call.
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const u8,
    len: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    const NULL: ModuleBuffer = ModuleBuffer {
        ptr: ptr::null(),
        len: 0,
    };
}

/// A header owned by the module.
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleHeader {
    key_ptr: *const u8,
    key_len: usize,
    value_ptr: *const u8,
    value_len: usize,
}

/// Lends `headers` to Envoy as the ABI's array: on the stack for the dozen an answer carries,
/// on the heap beyond.
fn with_module_headers<R>(headers: &[(&str, &str)], f: impl FnOnce(&[ModuleHeader]) -> R) -> R {
    let raw = |(k, v): &(&str, &str)| ModuleHeader {
        key_ptr: k.as_ptr(),
        key_len: k.len(),
        value_ptr: v.as_ptr(),
        value_len: v.len(),
    };
    const STACK: usize = 16;
    if headers.len() > STACK {
        return f(&headers.iter().map(raw).collect::<Vec<_>>());
    }
    let mut on_stack = [ModuleHeader {
        key_ptr: ptr::null(),
        key_len: 0,
        value_ptr: ptr::null(),
        value_len: 0,
    }; STACK];
    for (slot, h) in on_stack.iter_mut().zip(headers) {
        *slot = raw(h);
    }
    f(&on_stack[..headers.len()])
}

/// A header owned by Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    key_ptr: *const u8,
    key_len: usize,
    value_ptr: *const u8,
    value_len: usize,
}

// C enums are `int`-sized; they are passed and returned as `u32` so that a value this module
// does not know can never be an invalid Rust enum.
const HEADER_TYPE_REQUEST: u32 = 0;
const HEADER_TYPE_RESPONSE: u32 = 2;

const CALLOUT_INIT_SUCCESS: u32 = 0;
const CALLOUT_RESULT_SUCCESS: u32 = 0;

const METRICS_SUCCESS: u32 = 0;

const HEADERS_CONTINUE: u32 = 0;
const HEADERS_STOP_ITERATION: u32 = 1;
const BODY_CONTINUE: u32 = 0;
const TRAILERS_CONTINUE: u32 = 0;

/// Envoy's log levels, as the ABI numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum LogLevel {
    Info = 2,
    Warn = 3,
    Error = 4,
}

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_is_validation_mode() -> bool;
    fn envoy_dynamic_module_callback_get_concurrency() -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config_envoy: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_len: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config_envoy: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_len: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config_envoy: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config_envoy: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_len: usize,
        value: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config_envoy: *mut c_void,
        callout_id_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *const ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config_envoy: *mut c_void,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);

    fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        count_out: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter_envoy: *mut c_void,
        header_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter_envoy: *mut c_void,
        header_type: u32,
        result: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter_envoy: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy: *mut c_void,
        status: u32,
        headers: *const ModuleHeader,
        headers_len: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_send_response_headers(
        filter_envoy: *mut c_void,
        headers: *const ModuleHeader,
        headers_len: usize,
        end_stream: bool,
    );
    fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter_envoy: *mut c_void)
        -> u32;
}

// ---------------------------------------------------------------------------------------
// Safe wrappers
// ---------------------------------------------------------------------------------------

/// Borrows an Envoy buffer for `'a`. A null pointer reads as empty; so does a length that
/// comes with no pointer.
///
/// # Safety
/// When `ptr` is not null it must point at `len` readable bytes that stay valid for `'a`.
unsafe fn envoy_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// Writes a line to Envoy's log (the `dynamic_modules` component).
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the buffer is valid for the call; Envoy copies it.
    unsafe { envoy_dynamic_module_callback_log(level as u32, ModuleBuffer::of(message.as_bytes())) }
}

/// True under `envoy --mode validate`, where nothing should be started.
pub fn is_validation_mode() -> bool {
    // SAFETY: no pointers; called on the main thread (configuration time).
    unsafe { envoy_dynamic_module_callback_is_validation_mode() }
}

/// Envoy's worker-thread count (main thread, at configuration time).
pub fn concurrency() -> u32 {
    // SAFETY: no pointers; called on the main thread (configuration time).
    unsafe { envoy_dynamic_module_callback_get_concurrency() }
}

/// Envoy's filter configuration object (main thread only, except where noted).
#[derive(Clone, Copy)]
pub struct ConfigHandle {
    raw: *mut c_void,
}

/// Why a callout could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalloutRefused(pub u32);

impl std::fmt::Display for CalloutRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.0 {
            1 => "missing required headers",
            2 => "cluster not found",
            3 => "duplicate callout id",
            4 => "cannot create request",
            _ => "unknown reason",
        };
        write!(f, "{what} ({})", self.0)
    }
}

impl ConfigHandle {
    /// Defines a counter; only while the configuration is being created.
    pub fn define_counter(&self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: `raw` came from Envoy for this configuration; the buffers are valid for the
        // call; no labels.
        let r = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.raw,
                ModuleBuffer::of(name.as_bytes()),
                ptr::null(),
                0,
                &mut id,
            )
        };
        (r == METRICS_SUCCESS).then_some(id)
    }

    /// Defines a gauge; only while the configuration is being created.
    pub fn define_gauge(&self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: as in `define_counter`.
        let r = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_gauge(
                self.raw,
                ModuleBuffer::of(name.as_bytes()),
                ptr::null(),
                0,
                &mut id,
            )
        };
        (r == METRICS_SUCCESS).then_some(id)
    }

    /// Adds `n` to a counter defined on this configuration.
    pub fn increment_counter(&self, id: usize, n: u64) -> bool {
        // SAFETY: no labels; `raw` is this configuration's.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.raw,
                id,
                ptr::null(),
                0,
                n,
            ) == METRICS_SUCCESS
        }
    }

    /// Sets a gauge defined on this configuration.
    pub fn set_gauge(&self, id: usize, value: u64) -> bool {
        // SAFETY: as in `increment_counter`.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_set_gauge(
                self.raw,
                id,
                ptr::null(),
                0,
                value,
            ) == METRICS_SUCCESS
        }
    }

    /// Sends an HTTP request to `cluster` (main thread). Envoy answers through
    /// [`Plugin::callout_done`] with the returned id, whatever happens to the request.
    pub fn http_callout(
        &self,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, CalloutRefused> {
        // A request has a handful of headers: kept on the stack.
        let mut raw = [ModuleHeader {
            key_ptr: ptr::null(),
            key_len: 0,
            value_ptr: ptr::null(),
            value_len: 0,
        }; 8];
        let n = headers.len().min(raw.len());
        for (slot, (k, v)) in raw.iter_mut().zip(headers) {
            *slot = ModuleHeader {
                key_ptr: k.as_ptr(),
                key_len: k.len(),
                value_ptr: v.as_ptr(),
                value_len: v.len(),
            };
        }
        let mut id = 0u64;
        // SAFETY: every buffer is valid for the call and Envoy copies what it keeps.
        let r = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.raw,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                raw.as_ptr(),
                n,
                if body.is_empty() {
                    ModuleBuffer::NULL
                } else {
                    ModuleBuffer::of(body)
                },
                timeout_ms,
            )
        };
        if r == CALLOUT_INIT_SUCCESS {
            Ok(id)
        } else {
            Err(CalloutRefused(r))
        }
    }

    /// A scheduler that runs [`Plugin::scheduled`] on the main thread, committed from any
    /// thread.
    pub fn scheduler(&self) -> Option<Scheduler> {
        // SAFETY: `raw` is this configuration's; Envoy allocates the scheduler.
        let raw =
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.raw) };
        (!raw.is_null()).then_some(Scheduler { raw })
    }
}

/// Posts events to the main thread. Envoy's scheduler may be committed from any thread; it
/// must be deleted (dropped) before the configuration it belongs to is destroyed.
pub struct Scheduler {
    raw: *mut c_void,
}

// SAFETY: Envoy documents the scheduler's commit as callable from any thread; deletion happens
// once, in `Drop`, which takes the scheduler by value.
unsafe impl Send for Scheduler {}
// SAFETY: as above; `commit` takes `&self` and Envoy synchronises posting internally.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    pub fn commit(&self, event: u64) {
        // SAFETY: `raw` is live until `Drop`.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.raw, event)
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: created by `scheduler_new`, deleted exactly once.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.raw) }
    }
}

/// Envoy's per-stream filter object, valid for the duration of one hook.
pub struct FilterHandle<'a> {
    raw: *mut c_void,
    _hook: PhantomData<&'a ()>,
}

impl<'a> FilterHandle<'a> {
    /// The first value of request header `name` (lower case), borrowed from Envoy until the
    /// headers are next changed, and how many values it has.
    pub fn request_header(&self, name: &str) -> (Option<&'a [u8]>, usize) {
        self.header(HEADER_TYPE_REQUEST, name)
    }

    fn header(&self, header_type: u32, name: &str) -> (Option<&'a [u8]>, usize) {
        let mut value = EnvoyBuffer {
            ptr: ptr::null(),
            len: 0,
        };
        let mut count = 0usize;
        // SAFETY: `raw` is the live filter of the current hook; the out-pointers are ours.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.raw,
                header_type,
                ModuleBuffer::of(name.as_bytes()),
                &mut value,
                0,
                &mut count,
            )
        };
        if !ok || count == 0 {
            return (None, 0);
        }
        // SAFETY: Envoy points into its header map, valid until the map changes; the borrow
        // is bounded by the hook (`'a`) and callers read before they write.
        (Some(unsafe { envoy_bytes(value.ptr, value.len) }), count)
    }

    /// Visits the name of every request header, as Envoy holds them, in order (a repeated
    /// header once per copy). The names stay valid until the header they belong to is
    /// removed. False when Envoy could not list them.
    pub fn for_each_request_header_name(&self, mut visit: impl FnMut(&'a [u8])) -> bool {
        // SAFETY: `raw` is the live filter of the current hook.
        let n = unsafe {
            envoy_dynamic_module_callback_http_get_headers_size(self.raw, HEADER_TYPE_REQUEST)
        };
        if n == 0 {
            return true;
        }
        // Requests rarely carry more than a few dozen headers: those fit on the stack.
        const STACK: usize = 64;
        let empty = EnvoyHeader {
            key_ptr: ptr::null(),
            key_len: 0,
            value_ptr: ptr::null(),
            value_len: 0,
        };
        let mut on_stack = [empty; STACK];
        let mut on_heap = Vec::new();
        let slots: &mut [EnvoyHeader] = match on_stack.get_mut(..n) {
            Some(s) => s,
            None => {
                on_heap.resize(n, empty);
                &mut on_heap
            }
        };
        // SAFETY: `slots` has room for the `n` headers Envoy reported.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_headers(
                self.raw,
                HEADER_TYPE_REQUEST,
                slots.as_mut_ptr(),
            )
        };
        if !ok {
            return false;
        }
        for h in slots.iter() {
            // SAFETY: Envoy's buffers, valid until the header is removed or the hook ends.
            visit(unsafe { envoy_bytes(h.key_ptr, h.key_len) });
        }
        true
    }

    /// Replaces every value of request header `name` with `value`.
    pub fn set_request_header(&self, name: &str, value: &[u8]) -> bool {
        // SAFETY: buffers valid for the call; Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.raw,
                HEADER_TYPE_REQUEST,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    /// Removes every value of request header `name` (a null value removes, in this ABI).
    pub fn remove_request_header(&self, name: &[u8]) -> bool {
        // SAFETY: as in `set_request_header`.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.raw,
                HEADER_TYPE_REQUEST,
                ModuleBuffer::of(name),
                ModuleBuffer::NULL,
            )
        }
    }

    /// Adds a response header (in the response-headers hook).
    pub fn add_response_header(&self, name: &str, value: &[u8]) -> bool {
        // SAFETY: as in `set_request_header`.
        unsafe {
            envoy_dynamic_module_callback_http_add_header(
                self.raw,
                HEADER_TYPE_RESPONSE,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    /// Answers the request locally (Envoy's local reply: its access log and details).
    pub fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8], details: &str) {
        with_module_headers(headers, |raw| {
            // SAFETY: every buffer is valid for the call; Envoy copies them.
            unsafe {
                envoy_dynamic_module_callback_http_send_response(
                    self.raw,
                    status,
                    raw.as_ptr(),
                    raw.len(),
                    ModuleBuffer::of(body),
                    ModuleBuffer::of(details.as_bytes()),
                )
            }
        })
    }

    /// Answers the request with headers only (`:status` among them) and ends the stream: a
    /// gRPC trailers-only answer, which Envoy's local reply cannot carry with a status of
    /// ours.
    pub fn send_headers_only(&self, headers: &[(&str, &str)]) {
        with_module_headers(headers, |raw| {
            // SAFETY: every buffer is valid for the call; Envoy copies them.
            unsafe {
                envoy_dynamic_module_callback_http_send_response_headers(
                    self.raw,
                    raw.as_ptr(),
                    raw.len(),
                    true,
                )
            }
        })
    }

    /// The index of the worker thread running this stream (0-based).
    pub fn worker_index(&self) -> u32 {
        // SAFETY: `raw` is the live filter of the current hook.
        unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(self.raw) }
    }
}

/// A callout's answer, borrowed from Envoy for the duration of the hook.
pub struct Answer<'a> {
    /// False when the callout failed without an HTTP answer (reset, timeout, overflow).
    pub ok: bool,
    headers: &'a [EnvoyHeader],
    chunks: &'a [EnvoyBuffer],
}

impl<'a> Answer<'a> {
    /// The `:status` of the answer, if it had one.
    pub fn status(&self) -> Option<u32> {
        if !self.ok {
            return None;
        }
        self.headers.iter().find_map(|h| {
            // SAFETY: Envoy's buffers, valid for the hook.
            let (k, v) = unsafe {
                (
                    envoy_bytes(h.key_ptr, h.key_len),
                    envoy_bytes(h.value_ptr, h.value_len),
                )
            };
            if k == b":status" {
                std::str::from_utf8(v).ok()?.parse().ok()
            } else {
                None
            }
        })
    }

    /// The body's size in bytes.
    pub fn body_len(&self) -> usize {
        self.chunks.iter().map(|c| c.len).sum()
    }

    /// The body, copied into one buffer.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body_len());
        for c in self.chunks {
            // SAFETY: Envoy's buffers, valid for the hook.
            out.extend_from_slice(unsafe { envoy_bytes(c.ptr, c.len) });
        }
        out
    }
}

/// What the request- and response-headers hooks tell Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headers {
    Continue,
    /// The filter answered locally (or will): stop the chain.
    Stop,
}

impl Headers {
    fn code(self) -> u32 {
        match self {
            Headers::Continue => HEADERS_CONTINUE,
            Headers::Stop => HEADERS_STOP_ITERATION,
        }
    }
}

/// What a module built on these bindings implements. One value per filter configuration,
/// shared by every worker (hence `Sync`); one `Stream` per HTTP stream.
pub trait Plugin: Sync + Sized + 'static {
    type Stream;

    /// The filter configuration is being created (main thread). `None` rejects it; the
    /// plugin logs why.
    fn configure(envoy: ConfigHandle, name: &[u8], config: &[u8]) -> Option<Self>;
    /// An event committed through a [`Scheduler`] (main thread).
    fn scheduled(&self, envoy: ConfigHandle, event: u64);
    /// The answer to [`ConfigHandle::http_callout`] (main thread).
    fn callout_done(&self, envoy: ConfigHandle, callout: u64, answer: &Answer<'_>);
    /// The configuration is going away (main thread): stop what it started.
    fn shutdown(&self) {}

    fn new_stream(&self, envoy: &FilterHandle<'_>) -> Self::Stream;
    fn request_headers(&self, stream: &mut Self::Stream, envoy: &FilterHandle<'_>) -> Headers;
    fn response_headers(&self, stream: &mut Self::Stream, envoy: &FilterHandle<'_>) -> Headers;
    /// A hook panicked on the request path: answer 503 (unless answered already) and count it.
    fn request_panicked(&self, envoy: &FilterHandle<'_>);
    /// A request reached a stream that has no plugin (Envoy passed no module pointer, which
    /// it never should): refuse it, failing closed.
    fn refuse_unconfigured(envoy: &FilterHandle<'_>);
    /// A hook panicked anywhere else: count it.
    fn panicked(&self);
}

/// Runs `f`, turning a panic into `fallback()`: nothing unwinds into Envoy.
pub fn guard<R>(fallback: impl FnOnce() -> R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => fallback(),
    }
}

/// The module-side state of one filter configuration.
struct ConfigBox<P: Plugin> {
    plugin: P,
    /// Per worker, the stream objects of finished streams, reused by the next ones: once a
    /// worker has seen its peak of concurrent streams, a stream allocates nothing.
    pools: Box<[Pool<P>]>,
}

type Pool<P> = Mutex<Vec<Box<StreamBox<P>>>>;

/// Most stream objects a worker keeps for reuse.
const POOL_CAP: usize = 1024;

impl<P: Plugin> ConfigBox<P> {
    fn pool(&self, worker: usize) -> Option<&Pool<P>> {
        self.pools.get(worker % self.pools.len().max(1))
    }
}

/// The module-side state of one HTTP stream.
struct StreamBox<P: Plugin> {
    config: *const ConfigBox<P>,
    worker: usize,
    stream: P::Stream,
}

// The event hooks' bodies, generic over the plugin and instantiated below for
// `crate::Module` under the symbol names Envoy looks up.
mod hooks {
    use super::*;

    pub(super) fn program_init() -> *const u8 {
        ABI_VERSION.as_ptr()
    }

    pub(super) fn config_new<P: Plugin>(
        envoy: *mut c_void,
        name: EnvoyBuffer,
        config: EnvoyBuffer,
    ) -> *const c_void {
        if envoy.is_null() {
            return ptr::null();
        }
        guard(ptr::null, || {
            // SAFETY: Envoy's buffers, valid for this hook.
            let (name, config) = unsafe {
                (
                    envoy_bytes(name.ptr, name.len),
                    envoy_bytes(config.ptr, config.len),
                )
            };
            let Some(plugin) = P::configure(ConfigHandle { raw: envoy }, name, config) else {
                return ptr::null();
            };
            // One more than the workers, should Envoy ever run a stream elsewhere.
            let workers = concurrency().max(1) as usize + 1;
            let pools = (0..workers)
                .map(|_| Mutex::new(Vec::with_capacity(64)))
                .collect();
            Box::into_raw(Box::new(ConfigBox { plugin, pools })) as *const c_void
        })
    }

    /// # Safety
    /// `module` is null or a pointer returned by `config_new::<P>`, not yet destroyed.
    unsafe fn config<'a, P: Plugin>(module: *const c_void) -> Option<&'a ConfigBox<P>> {
        // SAFETY: the caller's contract.
        unsafe { module.cast::<ConfigBox<P>>().as_ref() }
    }

    pub(super) fn config_destroy<P: Plugin>(module: *const c_void) {
        if module.is_null() {
            return;
        }
        // SAFETY: Envoy destroys each configuration once, after every stream it created.
        let boxed = unsafe { Box::from_raw(module as *mut ConfigBox<P>) };
        let plugin = &boxed.plugin;
        guard(|| plugin.panicked(), || plugin.shutdown());
        // A panic while dropping is caught too: the configuration is leaked rather than
        // unwinding into Envoy.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(boxed)));
    }

    pub(super) fn config_scheduled<P: Plugin>(
        envoy: *mut c_void,
        module: *const c_void,
        event: u64,
    ) {
        // SAFETY: Envoy passes the pointer `config_new` returned.
        let Some(c) = (unsafe { config::<P>(module) }) else {
            return;
        };
        if envoy.is_null() {
            return;
        }
        guard(
            || c.plugin.panicked(),
            || c.plugin.scheduled(ConfigHandle { raw: envoy }, event),
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn config_callout_done<P: Plugin>(
        envoy: *mut c_void,
        module: *const c_void,
        callout: u64,
        result: u32,
        headers: *const EnvoyHeader,
        headers_len: usize,
        chunks: *const EnvoyBuffer,
        chunks_len: usize,
    ) {
        // SAFETY: Envoy passes the pointer `config_new` returned.
        let Some(c) = (unsafe { config::<P>(module) }) else {
            return;
        };
        if envoy.is_null() {
            return;
        }
        // SAFETY: Envoy's arrays, valid for this hook; null reads as empty.
        let (headers, chunks) = unsafe {
            (
                if headers.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(headers, headers_len)
                },
                if chunks.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(chunks, chunks_len)
                },
            )
        };
        let answer = Answer {
            ok: result == CALLOUT_RESULT_SUCCESS,
            headers,
            chunks,
        };
        guard(
            || c.plugin.panicked(),
            || {
                c.plugin
                    .callout_done(ConfigHandle { raw: envoy }, callout, &answer)
            },
        );
    }

    pub(super) fn filter_new<P: Plugin>(
        module: *const c_void,
        envoy: *mut c_void,
    ) -> *const c_void {
        // SAFETY: Envoy passes the pointer `config_new` returned, alive while it has streams.
        let Some(c) = (unsafe { config::<P>(module) }) else {
            return ptr::null();
        };
        if envoy.is_null() {
            return ptr::null();
        }
        let handle = FilterHandle {
            raw: envoy,
            _hook: PhantomData,
        };
        guard(
            || {
                c.plugin.panicked();
                ptr::null()
            },
            || {
                let stream = c.plugin.new_stream(&handle);
                let worker = handle.worker_index() as usize;
                let reused = c
                    .pool(worker)
                    .and_then(|p| p.lock().unwrap_or_else(PoisonError::into_inner).pop());
                let boxed = match reused {
                    Some(mut b) => {
                        b.stream = stream;
                        b.worker = worker;
                        b
                    }
                    None => Box::new(StreamBox::<P> {
                        config: c as *const ConfigBox<P>,
                        worker,
                        stream,
                    }),
                };
                Box::into_raw(boxed) as *const c_void
            },
        )
    }

    /// # Safety
    /// `module` is null or a pointer returned by `filter_new::<P>`, not yet destroyed, used by
    /// one thread at a time (Envoy runs a stream's hooks on its worker).
    unsafe fn stream<'a, P: Plugin>(module: *const c_void) -> Option<(&'a P, &'a mut P::Stream)> {
        // SAFETY: the caller's contract; the configuration outlives its streams.
        unsafe {
            let s = (module as *mut StreamBox<P>).as_mut()?;
            let c = s.config.as_ref()?;
            Some((&c.plugin, &mut s.stream))
        }
    }

    pub(super) fn request_headers<P: Plugin>(envoy: *mut c_void, module: *const c_void) -> u32 {
        if envoy.is_null() {
            // Nothing can be answered; nothing may pass either.
            return HEADERS_STOP_ITERATION;
        }
        let handle = FilterHandle {
            raw: envoy,
            _hook: PhantomData,
        };
        // SAFETY: Envoy passes the pointer `filter_new` returned, on the stream's worker.
        let Some((plugin, stream)) = (unsafe { stream::<P>(module) }) else {
            guard(|| (), || P::refuse_unconfigured(&handle));
            return HEADERS_STOP_ITERATION;
        };
        guard(
            || {
                plugin.request_panicked(&handle);
                HEADERS_STOP_ITERATION
            },
            || plugin.request_headers(stream, &handle).code(),
        )
    }

    pub(super) fn response_headers<P: Plugin>(envoy: *mut c_void, module: *const c_void) -> u32 {
        // SAFETY: as in `request_headers`.
        let Some((plugin, stream)) = (unsafe { stream::<P>(module) }) else {
            return HEADERS_CONTINUE;
        };
        if envoy.is_null() {
            return HEADERS_CONTINUE;
        }
        let handle = FilterHandle {
            raw: envoy,
            _hook: PhantomData,
        };
        guard(
            || {
                plugin.panicked();
                HEADERS_CONTINUE
            },
            || plugin.response_headers(stream, &handle).code(),
        )
    }

    pub(super) fn filter_destroy<P: Plugin>(module: *const c_void) {
        if module.is_null() {
            return;
        }
        // SAFETY: Envoy destroys each stream's filter once, before the configuration.
        let boxed = unsafe { Box::from_raw(module as *mut StreamBox<P>) };
        let _ = catch_unwind(AssertUnwindSafe(move || {
            // SAFETY: the configuration outlives its streams.
            let Some(c) = (unsafe { boxed.config.as_ref() }) else {
                return;
            };
            if let Some(pool) = c.pool(boxed.worker) {
                let mut pool = pool.lock().unwrap_or_else(PoisonError::into_inner);
                if pool.len() < POOL_CAP {
                    pool.push(boxed);
                }
            }
        }));
    }
}

// ---------------------------------------------------------------------------------------
// The event hooks Envoy 1.40 looks up. Hooks the filter has no use for answer "continue" or
// do nothing: Envoy requires them all to be present.
//
// Safety, for every hook: Envoy passes the pointers the ABI documents for it: its own
// objects, the module pointers this module returned, and buffers valid for the call.
// ---------------------------------------------------------------------------------------

type Module = crate::Module;

#[cfg(test)]
pub(crate) mod fake_envoy;

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    hooks::program_init()
}

/// # Safety
/// See the section comment.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: *mut c_void,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    hooks::config_new::<Module>(envoy, name, config)
}

/// # Safety
/// See the section comment.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(module: *const c_void) {
    hooks::config_destroy::<Module>(module)
}

/// # Safety
/// See the section comment.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    envoy: *mut c_void,
    module: *const c_void,
    event: u64,
) {
    hooks::config_scheduled::<Module>(envoy, module, event)
}

/// # Safety
/// See the section comment.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    envoy: *mut c_void,
    module: *const c_void,
    callout: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) {
    hooks::config_callout_done::<Module>(
        envoy,
        module,
        callout,
        result,
        headers,
        headers_len,
        chunks,
        chunks_len,
    )
}

/// # Safety
/// See the section comment.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    module: *const c_void,
    envoy: *mut c_void,
) -> *const c_void {
    hooks::filter_new::<Module>(module, envoy)
}

/// # Safety
/// See the section comment.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: *mut c_void,
    module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    hooks::request_headers::<Module>(envoy, module)
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _envoy: *mut c_void,
    _module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _envoy: *mut c_void,
    _module: *const c_void,
) -> u32 {
    TRAILERS_CONTINUE
}

/// # Safety
/// See the section comment.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: *mut c_void,
    module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    hooks::response_headers::<Module>(envoy, module)
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: *mut c_void,
    _module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: *mut c_void,
    _module: *const c_void,
) -> u32 {
    TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _envoy: *mut c_void,
    _module: *const c_void,
) {
}

/// # Safety
/// See the section comment.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: *const c_void) {
    hooks::filter_destroy::<Module>(module)
}

// Per-stream callouts, streams and scheduling: tokengate uses none of them.

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: *mut c_void,
    _module: *const c_void,
    _callout: u64,
    _result: u32,
    _headers: *const EnvoyHeader,
    _headers_len: usize,
    _chunks: *const EnvoyBuffer,
    _chunks_len: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: *mut c_void,
    _module: *const c_void,
    _stream: u64,
    _headers: *const EnvoyHeader,
    _headers_len: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: *mut c_void,
    _module: *const c_void,
    _stream: u64,
    _data: *const EnvoyBuffer,
    _data_len: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: *mut c_void,
    _module: *const c_void,
    _stream: u64,
    _trailers: *const EnvoyHeader,
    _trailers_len: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: *mut c_void,
    _module: *const c_void,
    _stream: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: *mut c_void,
    _module: *const c_void,
    _stream: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _envoy: *mut c_void,
    _module: *const c_void,
    _event: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: *mut c_void,
    _module: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: *mut c_void,
    _module: *const c_void,
) {
}

#[cfg(test)]
mod tests {
    use super::fake_envoy::{FakeConfig, FakeFilter};
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    static PANICS: AtomicU64 = AtomicU64::new(0);

    /// A plugin whose hooks panic on demand.
    struct Panicky;

    impl Plugin for Panicky {
        type Stream = ();
        fn configure(_: ConfigHandle, _: &[u8], config: &[u8]) -> Option<Self> {
            if config == b"panic" {
                panic!("configure panicked");
            }
            Some(Panicky)
        }
        fn scheduled(&self, _: ConfigHandle, _: u64) {
            panic!("scheduled panicked");
        }
        fn callout_done(&self, _: ConfigHandle, _: u64, _: &Answer<'_>) {}
        fn new_stream(&self, _: &FilterHandle<'_>) {}
        fn request_headers(&self, _: &mut (), envoy: &FilterHandle<'_>) -> Headers {
            if envoy.request_header("x-panic").0.is_some() {
                panic!("request_headers panicked");
            }
            Headers::Continue
        }
        fn response_headers(&self, _: &mut (), _: &FilterHandle<'_>) -> Headers {
            panic!("response_headers panicked");
        }
        fn request_panicked(&self, envoy: &FilterHandle<'_>) {
            PANICS.fetch_add(1, Ordering::SeqCst);
            envoy.send_response(503, &[], b"caught", "panic");
        }
        fn panicked(&self) {
            PANICS.fetch_add(1, Ordering::SeqCst);
        }
        fn refuse_unconfigured(envoy: &FilterHandle<'_>) {
            envoy.send_response(503, &[], b"unconfigured", "unconfigured");
        }
    }

    fn buffer(b: &[u8]) -> EnvoyBuffer {
        EnvoyBuffer {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }

    #[test]
    fn panics_never_cross_the_boundary() {
        let envoy = FakeConfig::default();
        // A panic while configuring rejects the configuration.
        assert!(
            hooks::config_new::<Panicky>(envoy.ptr(), buffer(b"n"), buffer(b"panic")).is_null()
        );
        let module = hooks::config_new::<Panicky>(envoy.ptr(), buffer(b"n"), buffer(b"ok"));
        assert!(!module.is_null());
        let before = PANICS.load(Ordering::SeqCst);
        // On the request path: a 503, counted, and the chain stops.
        let f = FakeFilter::with(&[("x-panic", "1")]);
        let stream = hooks::filter_new::<Panicky>(module, f.ptr());
        assert_eq!(
            hooks::request_headers::<Panicky>(f.ptr(), stream),
            HEADERS_STOP_ITERATION
        );
        let sent = f.sent.borrow().clone().unwrap();
        assert_eq!((sent.status, sent.body.as_str()), (503, "caught"));
        // Elsewhere: counted, and Envoy carries on.
        assert_eq!(
            hooks::response_headers::<Panicky>(f.ptr(), stream),
            HEADERS_CONTINUE
        );
        hooks::config_scheduled::<Panicky>(envoy.ptr(), module, 1);
        assert_eq!(PANICS.load(Ordering::SeqCst) - before, 3);
        hooks::filter_destroy::<Panicky>(stream);
        // A stream that does not panic is untouched.
        let calm = FakeFilter::with(&[]);
        let stream = hooks::filter_new::<Panicky>(module, calm.ptr());
        assert_eq!(
            hooks::request_headers::<Panicky>(calm.ptr(), stream),
            HEADERS_CONTINUE
        );
        assert!(calm.sent.borrow().is_none());
        hooks::filter_destroy::<Panicky>(stream);
        hooks::config_destroy::<Panicky>(module);
    }

    #[test]
    fn null_pointers_from_envoy_are_refused() {
        let envoy = FakeConfig::default();
        assert!(
            hooks::config_new::<Panicky>(ptr::null_mut(), buffer(b"n"), buffer(b"ok")).is_null()
        );
        let module = hooks::config_new::<Panicky>(envoy.ptr(), buffer(b"n"), buffer(b"ok"));
        let f = FakeFilter::with(&[]);
        assert!(hooks::filter_new::<Panicky>(ptr::null(), f.ptr()).is_null());
        assert!(hooks::filter_new::<Panicky>(module, ptr::null_mut()).is_null());
        // No module for the stream: fail closed, with an answer.
        assert_eq!(
            hooks::request_headers::<Panicky>(f.ptr(), ptr::null()),
            HEADERS_STOP_ITERATION
        );
        assert_eq!(f.sent.borrow().clone().unwrap().body, "unconfigured");
        // No Envoy object: nothing to answer with, and nothing passes.
        let stream = hooks::filter_new::<Panicky>(module, f.ptr());
        assert_eq!(
            hooks::request_headers::<Panicky>(ptr::null_mut(), stream),
            HEADERS_STOP_ITERATION
        );
        // A buffer that claims bytes but has no pointer reads as empty.
        let bogus = EnvoyBuffer {
            ptr: ptr::null(),
            len: 5,
        };
        let other = hooks::config_new::<Panicky>(envoy.ptr(), bogus, bogus);
        assert!(!other.is_null());
        hooks::config_scheduled::<Panicky>(envoy.ptr(), ptr::null(), 1);
        hooks::config_destroy::<Panicky>(ptr::null());
        hooks::filter_destroy::<Panicky>(ptr::null());
        hooks::filter_destroy::<Panicky>(stream);
        hooks::config_destroy::<Panicky>(other);
        hooks::config_destroy::<Panicky>(module);
    }

    #[test]
    fn finished_streams_are_reused() {
        let envoy = FakeConfig::default();
        let module = hooks::config_new::<Panicky>(envoy.ptr(), buffer(b"n"), buffer(b"ok"));
        let f = FakeFilter::with(&[]);
        let first = hooks::filter_new::<Panicky>(module, f.ptr());
        hooks::filter_destroy::<Panicky>(first);
        let second = hooks::filter_new::<Panicky>(module, f.ptr());
        assert_eq!(first, second, "the pooled object came back");
        let third = hooks::filter_new::<Panicky>(module, f.ptr());
        assert_ne!(second, third, "a live stream's object is not shared");
        hooks::filter_destroy::<Panicky>(second);
        hooks::filter_destroy::<Panicky>(third);
        hooks::config_destroy::<Panicky>(module);
    }
}
